"""Options -> EngineConfig: find the checkpoint, read its config, check every option (ValueError naming
it, before anything loads), and fill in the defaults that depend on the model or the machine."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from kvloom.config import (
    BACKENDS,
    CPU_QUANTIZATIONS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    SCHEDULING_POLICIES,
    SPECULATIVE_METHODS,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    split_kwargs,
)
from kvloom.loader.checkpoint import resolve_checkpoint
from kvloom.models import get_model_class

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

GiB = 1 << 30


def _default_kv_cache_memory() -> int:
    """A tenth of physical memory, at most 2 GiB: plenty for small models, never crowding the host."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * GiB
    return min(2 * GiB, total // 10)


def resolve_dtype(
    dtype: str | torch.dtype, hf_config: Any, checkpoint_format: str, device: str
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # GGUF weights are dequantized, so pick the fastest float the device has: bf16.
        if checkpoint_format == "gguf":
            return torch.bfloat16
        # NOTE: transformers 5 calls it `dtype` and warns on `torch_dtype`; 4.x has only `torch_dtype`.
        name = "dtype" if hasattr(hf_config, "dtype") else "torch_dtype"
        cfg = getattr(hf_config, name, None)
        if cfg is None:
            return torch.bfloat16
        cfg = (
            cfg
            if isinstance(cfg, torch.dtype)
            else _DTYPES.get(str(cfg).removeprefix("torch."), torch.float32)
        )
        # float16 is slow on CPUs; bfloat16 has the same memory cost.
        return torch.bfloat16 if (cfg == torch.float16 and device == "cpu") else cfg
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_parallel(parallel: ParallelConfig, hf_config: Any, device: str, spec: SpeculativeConfig) -> None:
    """Tensor-parallel options against the model's shapes, before anything loads (as vLLM checks them)."""
    tp = parallel.tensor_parallel_size
    _positive("tensor_parallel_size", tp, allow_none=False)
    _positive("nnodes", parallel.nnodes, allow_none=False)
    _positive("dist_timeout", parallel.dist_timeout, allow_none=False)
    if tp % parallel.nnodes:
        raise ValueError(f"tensor_parallel_size {tp} must be a multiple of nnodes {parallel.nnodes}")
    if not isinstance(parallel.node_rank, int) or not 0 <= parallel.node_rank < parallel.nnodes:
        raise ValueError(
            f"node_rank must be in [0, nnodes - 1 = {parallel.nnodes - 1}], got {parallel.node_rank!r}"
        )
    addr = parallel.dist_init_addr
    if addr is not None and (":" not in addr or not addr.rpartition(":")[2].isdigit()):
        raise ValueError(f"dist_init_addr must be HOST:PORT, got {addr!r}")
    if parallel.nnodes > 1 and addr is None:
        raise ValueError("dist_init_addr: several nodes need HOST:PORT of node 0 (--dist-init-addr)")
    if tp == 1:
        return
    heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's {heads} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(
            f"tensor_parallel_size {tp} and the model's {kv} KV heads: one must divide the other "
            "(KV heads are split, or replicated when there are fewer than ranks)"
        )
    if hf_config.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} must divide the model's MLP size {hf_config.intermediate_size}"
        )
    if device.startswith("cuda"):  # one GPU per rank of this host
        import torch

        from kvloom.distributed.parallel_state import rank_device

        local = tp // parallel.nnodes
        rank_device(device, local - 1, local, torch.cuda.device_count())
    if spec.speculative_method == "draft":
        raise ValueError(
            "speculative_method: a draft model does not run with tensor_parallel_size > 1 yet (ngram does)"
        )


def _one_of(name: str, value: Any, choices: tuple, allow_none: bool = False) -> None:
    if not (value in choices or (allow_none and value is None)):
        unset = " (or unset)" if allow_none else ""
        raise ValueError(f"{name} must be one of {', '.join(choices)}{unset}, got {value!r}")


def create_engine_config(model: str | os.PathLike | None = None, **kwargs: Any) -> EngineConfig:
    """Resolve options (the fields of kvloom.config's groups, by name) into an EngineConfig."""
    groups = split_kwargs({"model": None if model is None else str(model), **kwargs})
    dtype = groups["model"].pop("dtype", "auto")  # a torch.dtype is accepted too; the field keeps a name
    m = ModelConfig(**groups["model"])
    cache = CacheConfig(**groups["cache"])
    sched = SchedulerConfig(**groups["scheduler"])
    spec = SpeculativeConfig(**groups["speculative"])
    parallel = ParallelConfig(**groups["parallel"])
    device = DeviceConfig(**groups["device"])

    checkpoint = resolve_checkpoint(m.model)
    hf_config = checkpoint.hf_config
    get_model_class(hf_config.model_type)  # unsupported architectures fail here, before any loading
    dev = device.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        device = dataclasses.replace(device, device=dev)
    if dev not in ("cpu", "cuda") and not dev.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {dev!r}")
    util = cache.gpu_memory_utilization
    if not isinstance(util, int | float) or not 0 < util <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
    context = int(getattr(hf_config, "max_position_embeddings", 2048))
    max_model_len = context if m.max_model_len is None else m.max_model_len
    _positive("max_model_len", max_model_len)
    if max_model_len > context:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context}")
    _positive("block_size", cache.block_size, allow_none=False)
    _positive("max_num_seqs", sched.max_num_seqs, allow_none=False)
    _positive("max_num_batched_tokens", sched.max_num_batched_tokens)
    _positive("num_kv_blocks", cache.num_kv_blocks)
    _positive("num_threads", parallel.num_threads)
    _check_parallel(parallel, hf_config, dev, spec)
    _one_of("scheduling_policy", sched.scheduling_policy, SCHEDULING_POLICIES)
    _one_of("quantization", m.quantization, QUANTIZATIONS)
    _one_of("backend", device.backend, BACKENDS)
    _one_of("kv_cache_dtype", cache.kv_cache_dtype, KV_CACHE_DTYPES)
    quant = m.quantization
    if checkpoint.quantization == "gptq" and parallel.tensor_parallel_size > 1:
        from kvloom.quantization import quantization_config

        if quantization_config(hf_config).get("desc_act"):
            raise ValueError(
                "tensor_parallel_size: GPTQ act-order (desc_act) checkpoints run on one rank (their groups "
                "are spread over all inputs, so layers split by inputs cannot be sliced)"
            )
    if checkpoint.quantization is not None and quant == checkpoint.quantization:
        quant = "auto"  # quantized that way already: run as written (no second calibration)
    if m.llm_int8_threshold is not None:
        if not m.llm_int8_threshold > 0:
            raise ValueError(f"llm_int8_threshold must be > 0, got {m.llm_int8_threshold!r}")
        if quant != "w8a8" and checkpoint.quantization != "w8a8":
            raise ValueError(
                "llm_int8_threshold: LLM.int8's decomposition applies to W8A8 layers: use --quantization "
                f"w8a8 or a W8A8 checkpoint (this run: quantization {m.quantization!r})"
            )
        if m.batch_invariant:
            raise ValueError(
                "batch_invariant: LLM.int8's outlier columns are chosen from all rows of a step, so no row's "
                "result can be independent of its batch: drop llm_int8_threshold or batch_invariant"
            )
    resolved_dtype = resolve_dtype(
        "bfloat16" if (quant in CPU_QUANTIZATIONS or checkpoint.quantization) and dtype == "auto" else dtype,
        hf_config,
        checkpoint.format,
        dev,
    )
    if quant in CPU_QUANTIZATIONS and (resolved_dtype != torch.bfloat16 or dev != "cpu"):
        raise ValueError(
            f"quantization: {quant} runs in kvloom's CPU kernels on bf16 activations; "
            f"use dtype bfloat16 on the cpu device (got {resolved_dtype}, {dev})"
        )
    _one_of("speculative_method", spec.speculative_method, SPECULATIVE_METHODS, allow_none=True)
    k = spec.num_speculative_tokens
    if not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"num_speculative_tokens must be in [1, 16], got {k!r}")
    if spec.speculative_model is not None and spec.speculative_method != "draft":
        raise ValueError("speculative_model: only the draft method uses a draft model")
    if not 1 <= spec.prompt_lookup_min <= spec.prompt_lookup_max:
        raise ValueError(
            "prompt_lookup_min/max: need 1 <= min <= max, "
            f"got {spec.prompt_lookup_min}, {spec.prompt_lookup_max}"
        )
    # The target as its own draft is only cheaper with smaller weights; a separate draft runs as is.
    spec_quant = spec.speculative_quantization or ("auto" if spec.speculative_model else "int4")
    _one_of("speculative_quantization", spec_quant, QUANTIZATIONS)
    return EngineConfig(
        model=dataclasses.replace(
            m,
            dtype=str(resolved_dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            quantization=quant,
            # NOTE: None draws one (the CLI's default, so sampling differs from run to run; logged by the
            # engine so that a run can be repeated with --seed).
            seed=m.seed if m.seed is not None else int.from_bytes(os.urandom(4), "little"),
        ),
        cache=dataclasses.replace(
            cache,
            # the CPU's default here; on CUDA the backend sizes the pool from free memory after loading
            kv_cache_memory=cache.kv_cache_memory
            if cache.kv_cache_memory is not None or dev != "cpu"
            else _default_kv_cache_memory(),
            reserve_kv_cache=bool(cache.reserve_kv_cache),
            # the draft model's pool is addressed by the target's tables, whose blocks all stay
            disable_hybrid_kv_cache_manager=bool(cache.disable_hybrid_kv_cache_manager)
            or spec.speculative_method == "draft",
        ),
        scheduler=dataclasses.replace(
            sched, max_num_batched_tokens=sched.max_num_batched_tokens or max(2048, sched.max_num_seqs)
        ),
        parallel=parallel,
        speculative=dataclasses.replace(
            spec,
            speculative_model=None if spec.speculative_model is None else str(spec.speculative_model),
            speculative_quantization=spec_quant,
        ),
        device=device,
        checkpoint=checkpoint,
        hf_config=hf_config,
        dtype=resolved_dtype,
    )
