"""EngineConfig: one frozen dataclass for model, cache, scheduler and device, built once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kvloom.core.scheduler import POLICIES
from kvloom.layers.quantization import QUANTIZATIONS
from kvloom.loader.checkpoint import Checkpoint, resolve_checkpoint
from kvloom.models import get_model_class
from kvloom.spec.proposers import SPECULATIVE_METHODS

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


@dataclass(frozen=True, eq=False)
class EngineConfig:
    """Everything the engine needs, resolved up front. Build with :meth:`create`."""

    checkpoint: Checkpoint
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    device: str
    max_model_len: int
    block_size: int
    kv_cache_memory: int  # bytes for the whole KV pool
    num_kv_blocks: int | None  # overrides kv_cache_memory when set (tests, tight budgets)
    # CPU: write the whole KV pool at start-up, as vLLM and llama.cpp do, instead of letting the OS map
    # its pages as the steps first write them (see ModelRunner._reserve_kv_pool)
    reserve_kv_cache: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    seed: int
    num_threads: int | None
    enable_prefix_caching: bool
    scheduling_policy: str  # fcfs | priority | fair
    cpu_kernels: bool  # bf16 on CPU: kvloom's C kernels where the CPU has AVX-512 BF16 (kvloom/kernels)
    quantization: str  # auto (GGUF runs quantized where the kernels run) | none | int8 | int4
    # Speculative decoding (kvloom/spec): None | ngram | draft; tokens proposed per step (at most);
    # the draft checkpoint (None: the target itself) and its quantization; ngram window sizes.
    speculative_method: str | None = None
    num_speculative_tokens: int = 3
    speculative_model: str | None = None
    speculative_quantization: str = "int4"
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    adaptive_speculation: bool = True  # per-request k from acceptance and cost; False: always k

    @classmethod
    def create(
        cls,
        model: str | os.PathLike | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        num_kv_blocks: int | None = None,
        reserve_kv_cache: bool = False,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        seed: int | None = 0,
        num_threads: int | None = None,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        cpu_kernels: bool = True,
        quantization: str = "auto",
        speculative_method: str | None = None,
        num_speculative_tokens: int = 3,
        speculative_model: str | None = None,
        speculative_quantization: str | None = None,
        prompt_lookup_min: int = 2,
        prompt_lookup_max: int = 4,
        adaptive_speculation: bool = True,
    ) -> EngineConfig:
        checkpoint = resolve_checkpoint(model)
        hf_config = checkpoint.hf_config
        get_model_class(hf_config.model_type)  # unsupported architectures fail here, before any loading
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        context = int(getattr(hf_config, "max_position_embeddings", 2048))
        if max_model_len is None:
            max_model_len = context
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if max_model_len > context:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, max_num_seqs)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if scheduling_policy not in POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(POLICIES)}, got {scheduling_policy!r}"
            )
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        resolved_dtype = resolve_dtype(
            "bfloat16" if quantization in ("int8", "int4") and dtype == "auto" else dtype,
            hf_config,
            checkpoint.format,
            device,
        )
        if quantization in ("int8", "int4") and (resolved_dtype != torch.bfloat16 or device != "cpu"):
            raise ValueError(
                f"quantization: {quantization} runs in kvloom's CPU kernels on bf16 activations; "
                f"use dtype bfloat16 on the cpu device (got {resolved_dtype}, {device})"
            )
        if num_kv_blocks is not None and num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        if speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ValueError(
                f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} (or unset), "
                f"got {speculative_method!r}"
            )
        if not isinstance(num_speculative_tokens, int) or not 1 <= num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {num_speculative_tokens!r}")
        if speculative_model is not None and speculative_method != "draft":
            raise ValueError("speculative_model: only the draft method uses a draft model")
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min/max: need 1 <= min <= max, got {prompt_lookup_min}, {prompt_lookup_max}"
            )
        if speculative_quantization is None:
            # The target as its own draft is only cheaper with smaller weights; a separate draft runs as is.
            speculative_quantization = "auto" if speculative_model else "int4"
        if speculative_quantization not in QUANTIZATIONS:
            raise ValueError(
                f"speculative_quantization must be one of {', '.join(QUANTIZATIONS)}, "
                f"got {speculative_quantization!r}"
            )
        return cls(
            checkpoint=checkpoint,
            hf_config=hf_config,
            dtype=resolved_dtype,
            device=device,
            max_model_len=max_model_len,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory if kv_cache_memory is not None else _default_kv_cache_memory(),
            num_kv_blocks=num_kv_blocks,
            reserve_kv_cache=bool(reserve_kv_cache),
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            # NOTE: None draws one (the CLI's default, so sampling differs from run to run; logged by the
            # runner so that a run can be repeated with --seed).
            seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
            num_threads=num_threads,
            enable_prefix_caching=enable_prefix_caching,
            scheduling_policy=scheduling_policy,
            cpu_kernels=cpu_kernels,
            quantization=quantization,
            speculative_method=speculative_method,
            num_speculative_tokens=num_speculative_tokens,
            speculative_model=None if speculative_model is None else str(speculative_model),
            speculative_quantization=speculative_quantization,
            prompt_lookup_min=prompt_lookup_min,
            prompt_lookup_max=prompt_lookup_max,
            adaptive_speculation=adaptive_speculation,
        )

    @property
    def wants_cpu_kernels(self) -> bool:
        """Whether the model runs on kvloom's CPU kernels where the machine has them (bf16 on the CPU)."""
        return self.cpu_kernels and self.dtype == torch.bfloat16 and self.device == "cpu"

    @property
    def model_type(self) -> str:
        return self.hf_config.model_type

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.hf_config
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * c.num_hidden_layers * c.num_key_value_heads * self.head_dim * elem

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.checkpoint.eos_token_ids
