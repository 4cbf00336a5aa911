"""The CPU device's backend: a page-aligned, lazily committed KV pool, and for bf16 models where the CPU
has AVX-512 BF16 (and a compiler), kvloom's C kernels (kernels.py) for the linear layers, norms, SiLU,
attention (attention.py) and the fused decoder stack. Without the kernels (other dtypes, other CPUs,
``--backend torch``) the model runs on the PyTorch reference ops, with the same pool.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections import Counter

import numpy as np
import torch
from numpy._core.multiarray import _set_madvise_hugepage

from kvloom.backends.base import Backend
from kvloom.backends.cpu.attention import KernelAttention
from kvloom.backends.cpu.kernels import CpuKernels, load_cpu_kernels, use_cpu_kernels
from kvloom.config import EngineConfig
from kvloom.layers.kv_cache import KVFormat
from kvloom.layers.linear import Linear, LinearMethod
from kvloom.logger import init_logger

logger = init_logger(__name__)

PAGE = 4096  # the KV pool's alignment (bytes)
MADV_POPULATE_WRITE = 23  # Linux 5.14+


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, config: EngineConfig) -> None:
        wants = config.device.backend == "auto" and config.dtype == torch.bfloat16
        self.kernels: CpuKernels | None = load_cpu_kernels() if wants else None
        if self.kernels is None:
            super().__init__(config)  # refuses int8/int4/w8a8
            return
        self.config = config
        self.device = torch.device("cpu")
        self.attention = None  # chosen in prepare(), from the model's (this rank's) heads

    @property
    def keep_quantized(self) -> bool:
        # GGUF blocks run as they are under "auto"; int8/int4/w8a8 re-quantize the dequantized weights.
        return self.kernels is not None and self.config.model.quantization == "auto"

    def prepare(self, model: torch.nn.Module) -> None:
        if self.kernels is not None:
            self.kernels.set_batch_invariant(self.config.model.batch_invariant)
            use_cpu_kernels(
                model, self.kernels, self.config.model.quantization, self.config.model.llm_int8_threshold
            )
            a = model.model.layers[0].self_attn
            ok = KernelAttention.supports(
                self.config.dtype, a.num_heads, a.num_kv_heads, a.head_dim, self.config.cache.block_size
            )
            partial = any(layer.self_attn.rotary.rotary_dim != a.head_dim for layer in model.model.layers)
            fmt = KVFormat.of(self.config.cache.kv_cache_dtype)
            if ok and not partial:
                self.attention = KernelAttention(self.kernels, fmt)
                if model.fused_decode is not None:
                    model.fused_decode.kv_kind = self.attention.kv_kind
            else:
                logger.info(
                    "CPU kernels: attention of %d/%d heads x %d, block size %d%s runs on PyTorch ops",
                    a.num_heads,
                    a.num_kv_heads,
                    a.head_dim,
                    self.config.cache.block_size,
                    ", partial rotary," if partial else "",
                )
                from kvloom.layers.attention import TorchAttention

                self.attention = TorchAttention(fmt)
                model.fused_decode = None
        super().prepare(model)

    def describe(self, model: torch.nn.Module) -> str:
        if self.kernels is None:
            return "PyTorch ops"
        formats = Counter(
            m.quant for m in model.modules() if isinstance(m, Linear) and type(m.method) is not LinearMethod
        )
        return (
            "kvloom CPU kernels, linear weights "
            + ", ".join(f"{n} {k}" for k, n in sorted(formats.items()))
            + f", attention on {self.attention.name}"
            + (", one call per layer" if model.fused_decode is not None else "")
        )

    def argmax_ok(self, logits: torch.Tensor) -> bool:
        return self.kernels is not None and self.kernels.argmax_ok(logits)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.kernels.argmax(logits)

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled pool, page-aligned, whose pages the OS maps as they are first written.

        numpy's zeros come from calloc: the OS maps zero pages as they are first touched, instead of
        torch.zeros writing the whole pool up front (3 s for 2 GiB here). NOTE: without numpy's
        MADV_HUGEPAGE: the first token of each (layer, K/V, head) region would fault in and zero a whole
        2 MB page, 360 MB for SmolLM2, which took the first step 0.6-1 s here; with it only when
        reserve_kv_cache writes every page now anyway (fewer, larger faults).
        NOTE: page-aligned. calloc's memory starts 16 bytes into a page, which put every 64-byte load of
        the cache across two cache lines, and the last 16 bytes of a block on the next block's page:
        attention reading them mapped the zero page there, so the first write to that block faulted again
        and flushed every core's TLB (IPIs). 32 x (128, 128): 468-528 -> 550-597 tok/s.
        """
        nbytes = int(np.prod(shape)) * dtype.itemsize
        reserve = self.config.cache.reserve_kv_cache
        hugepages = _set_madvise_hugepage(reserve)
        try:
            raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
        finally:
            _set_madvise_hugepage(hugepages)
        start = -raw.ctypes.data % PAGE
        pool = torch.from_numpy(raw[start : start + nbytes]).view(dtype).view(shape)
        if reserve:
            _reserve(pool)
        return pool


def _reserve(pool: torch.Tensor) -> None:
    """Make every page of the KV pool resident now (reserve_kv_cache).

    Otherwise the OS maps the pool's pages as steps first write K/V into fresh blocks, and blocks are
    handed out in order, so every block is fresh until the pool has been used once: those faults cost a
    2048-token prefill step 90 ms of its 1.25 s here, and 32 x (128, 128) about 2-5% of its throughput
    (docs/architecture.md, "The KV pool is page-aligned"). Committing the memory up front is also what a
    server wants: a pool the host cannot back fails at start-up, not mid-request.
    madvise(MADV_POPULATE_WRITE) (Linux 5.14+) from as many threads as the engine has; elsewhere, or where
    the kernel refuses it, the pool is written with zeros (it is all zeros already)."""
    t0 = time.perf_counter()
    flat = pool.view(-1)
    nbytes = flat.numel() * flat.element_size()
    madvise = None
    if sys.platform.startswith("linux"):
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    failed: list[int] = []

    def populate(lo: int, hi: int) -> None:  # byte range, page-aligned lo
        for a in range(lo, hi, 64 << 20):
            if failed:
                return
            if madvise(flat.data_ptr() + a, min(64 << 20, hi - a), MADV_POPULATE_WRITE) != 0:
                failed.append(ctypes.get_errno())

    if madvise is not None:
        n = max(1, torch.get_num_threads())
        cuts = [nbytes * i // n // PAGE * PAGE for i in range(n)] + [nbytes]
        threads = [threading.Thread(target=populate, args=(cuts[i], cuts[i + 1])) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if madvise is None or failed:
        flat.zero_()
    logger.info(
        "KV cache: %.1f MiB reserved (every page written%s) in %.2fs",
        nbytes / (1 << 20),
        f"; madvise failed, errno {failed[0]}: zeros written" if failed else "",
        time.perf_counter() - t0,
    )
