"""The CUDA device's backend: the PyTorch reference ops for the layers, paged attention on kvloom's Triton
kernel (attention.py) where Triton imports and the shapes suit it, and a KV pool sized from the GPU's free
memory (``--gpu-memory-utilization``) unless ``--kv-cache-memory`` or ``--num-kv-blocks`` says otherwise, and
decode steps replayed from CUDA graphs captured at start-up (graphs.py) unless ``--enforce-eager``.
"""

from __future__ import annotations

import torch

from kvloom.backends.base import Backend
from kvloom.config import EngineConfig
from kvloom.logger import init_logger

logger = init_logger(__name__)


def gpu_kv_budget(free: int, total: int, utilization: float) -> int:
    """Bytes the KV pool may take: what keeps the process's GPU use within ``utilization`` of the card,
    given the bytes free now (after the weights)."""
    return max(0, int(free - (1.0 - utilization) * total))


def give_triton_kernels(model: torch.nn.Module) -> None:
    """Point the model's norms and MLP activations at the Triton kernels (backends/cuda/fused.py)."""
    from kvloom.backends.cuda.fused import TritonActMul, TritonRMSNorm
    from kvloom.layers.mlp import MLP
    from kvloom.layers.norm import RMSNorm

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = TritonRMSNorm()
        elif isinstance(module, MLP) and module.act in ("silu", "gelu_pytorch_tanh"):
            module.fused_act = TritonActMul(module.act)


class CudaBackend(Backend):
    name = "cuda"
    triton = False  # whether the Triton kernels run (Triton imports, --backend auto)
    use_graphs = False  # whether decode steps replay CUDA graphs (Triton attention, not --enforce-eager)
    graph_type = None  # the graph class (graphs.CudaGraph); tests replay by running the forward again
    graphs = None  # graphs.DecodeGraphs, once captured

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)  # PyTorch attention; refuses int8/int4
        if config.device.backend != "auto":
            return
        try:
            from kvloom.backends.cuda.attention import TritonAttention
        except ImportError as e:  # no Triton on this host
            logger.info("CUDA: paged attention on PyTorch ops (Triton does not import: %s)", e)
            return
        self.triton = True
        if self.attention.fmt is not None:
            logger.info(
                "CUDA: --kv-cache-dtype %s: paged attention on PyTorch ops (the Triton kernels read caches "
                "in the model's dtype)",
                config.cache.kv_cache_dtype,
            )
        elif TritonAttention.supports(config.cache.block_size, config.head_dim):
            self.attention = TritonAttention()
            self.use_graphs = not config.device.enforce_eager and self.device.type == "cuda"
        else:
            logger.info(
                "CUDA: block size %d / head_dim %d: paged attention on PyTorch ops",
                config.cache.block_size,
                config.head_dim,
            )

    def prepare(self, model: torch.nn.Module) -> None:
        super().prepare(model)
        if self.triton:
            give_triton_kernels(model)

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.use_graphs:  # one spare block: the decode graphs' padding rows write and read it
            shape = (*shape[:3], shape[3] + 1, *shape[4:])
        return super().allocate_kv_cache(shape, dtype)

    def capture_graphs(
        self, model: torch.nn.Module, kv_caches: list[torch.Tensor], layer_group: list[int]
    ) -> None:
        if not self.use_graphs:
            return
        unsafe = sorted(
            {type(m).__name__ for m in model.modules() if not getattr(m, "cuda_graph_safe", True)}
        )
        if unsafe:
            logger.info("CUDA graphs: off (%s reads the device during the forward)", ", ".join(unsafe))
            return
        from kvloom.backends.cuda.graphs import CudaGraph, DecodeGraphs, capture_sizes

        self.graphs = DecodeGraphs(
            model,
            kv_caches,
            layer_group,
            self.config.cache.block_size,
            self.config.model.max_model_len,
            capture_sizes(self.config.scheduler.max_num_seqs),
            self.graph_type or CudaGraph,
        )

    def replay(self, inp) -> torch.Tensor | None:  # noqa: ANN001 - ModelInput
        return None if self.graphs is None else self.graphs.run(inp)

    def describe(self, model: torch.nn.Module) -> str:
        fused = ", norms and activation on Triton" if self.triton else ""
        return f"PyTorch ops{fused}, attention on {self.attention.name}"

    def kv_cache_memory(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        budget = gpu_kv_budget(free, total, self.config.cache.gpu_memory_utilization)
        logger.info(
            "KV cache: %.2f GiB of %.2f GiB free on %s (gpu_memory_utilization %.2f of %.2f GiB)",
            budget / 2**30,
            free / 2**30,
            self.device,
            self.config.cache.gpu_memory_utilization,
            total / 2**30,
        )
        return budget
