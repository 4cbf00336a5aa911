"""The backend interface, implemented with PyTorch ops (the reference, any device).

A backend is applied to a built, loaded model (``prepare``): it may give layers methods of its own (a
LinearMethod per weight format, an attention implementation, fused norms and activation, a fused decoder
stack that declares the steps it takes). It allocates the KV pool in the layout its attention reads,
builds that attention's metadata from each step's ModelInput, may replay steps it recorded (CUDA graphs),
and may take the greedy argmax. Models and
layers never ask which backend runs them.
"""

from __future__ import annotations

import torch

from kvloom.config import CPU_QUANTIZATIONS, EngineConfig
from kvloom.layers.attention import TorchAttention
from kvloom.layers.kv_cache import KVFormat
from kvloom.models.llama import Attention


class Backend:
    name = "torch"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device.device)
        self.attention = TorchAttention(KVFormat.of(config.cache.kv_cache_dtype))
        if config.model.llm_int8_threshold is not None:
            raise ValueError(
                "llm_int8_threshold: LLM.int8's decomposition runs in kvloom's CPU kernels (x86-64 with "
                "AVX-512 BF16 and VNNI, a C compiler, --backend auto); they are not available here"
            )
        if config.model.batch_invariant:
            raise ValueError(
                "batch_invariant: kvloom's CPU kernels keep a row's bits whatever its batch; this backend "
                "runs PyTorch's own kernels, which promise no such thing (use --backend auto with a bf16 "
                "model on an x86-64 CPU with AVX-512 BF16)"
            )
        if config.model.quantization in CPU_QUANTIZATIONS:
            raise ValueError(
                f"quantization: {config.model.quantization} needs kvloom's CPU kernels (x86-64 with "
                "AVX-512 BF16, a C compiler, --backend auto); they are not available here"
            )

    @property
    def keep_quantized(self) -> bool:
        """Whether GGUF blocks load as they are (a linear method runs them), instead of dequantized."""
        return False

    def prepare(self, model: torch.nn.Module) -> None:
        """Apply this backend to a built, loaded model: its attention, and the layers that loaded quantized
        (``model.quantized``: BitNet's ternary ones; a backend with kernels takes them first) on PyTorch
        ops."""
        for module in model.modules():
            if isinstance(module, Attention):
                module.impl = self.attention
        from kvloom.layers.quantization import QuantizedTorchMethod, QuantizedWeight

        for key, shards in getattr(model, "quantized", {}).items():
            layer = model.get_submodule(key.removesuffix(".weight"))
            layer.method = QuantizedTorchMethod(
                QuantizedWeight.cat([s for _, s in sorted(shards.items())]), self.config.dtype
            )
            layer.weight = None
        model.quantized = {}

    def describe(self, model: torch.nn.Module) -> str:
        return "PyTorch ops"

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # NOTE: zero-filled, not empty: padded block-table entries and unwritten slots are read (then
        # masked out), and garbage there could be NaN, which masking does not remove.
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def kv_cache_memory(self) -> int:
        """Bytes for the KV pool when the options set none (the CUDA backend: from free GPU memory)."""
        raise ValueError(f"kv_cache_memory: set it (or num_kv_blocks) for the {self.device} device")

    def capture_graphs(
        self, model: torch.nn.Module, kv_caches: list[torch.Tensor], layer_group: list[int]
    ) -> None:
        """Record whatever the backend replays later (the CUDA backend: decode graphs), once the KV pool
        exists. ``layer_group``: each layer's KV group."""

    def replay(self, inp) -> torch.Tensor | None:  # noqa: ANN001 - ModelInput
        """The hidden states of a step the backend runs from a recording (``capture_graphs``); None: run
        the model."""
        return None

    def build_metadata(self, inp) -> list:  # noqa: ANN001 - ModelInput
        """The attention's metadata of each KV group."""
        bs = self.config.cache.block_size
        return [self.attention.build_metadata(inp, g, bs, self.device) for g in range(len(inp.block_tables))]

    def argmax_ok(self, logits: torch.Tensor) -> bool:
        """Whether ``argmax`` takes these model-dtype logits (a faster greedy pick than fp32 + torch)."""
        return False

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)
