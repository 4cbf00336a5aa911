"""Backends: what runs the model's math on a kind of hardware, behind one interface (base.Backend).

- ``base.Backend``: PyTorch ops on any device (the reference): the layers' own ops, TorchAttention, a
  zero-filled KV pool.
- ``cpu``: the CPU device. Its pool is page-aligned and allocated lazily (madvise, huge pages); for bf16
  models on x86-64 with AVX-512 BF16, kvloom's C kernels run the linear layers (packed bf16 or quantized
  blocks), norms, activation, attention (their own cache layout) and, where the model's shapes allow,
  the whole decoder stack in one call per step.
- ``cuda``: CUDA devices. The layers on PyTorch ops, paged attention on kvloom's Triton kernel, a KV pool
  sized from the GPU's free memory.

This init imports nothing at module level: the CLI starts a first compile of the CPU kernels
(``start_build``) before torch is imported.
"""

from __future__ import annotations

from typing import Any


def get_backend(config: Any):  # noqa: ANN201 - base.Backend
    """The backend of ``config.device``: ``cpu`` or ``cuda`` (``--backend torch`` asks each for the PyTorch
    reference)."""
    if config.device.device == "cpu":
        from kvloom.backends.cpu.backend import CpuBackend

        return CpuBackend(config)
    from kvloom.backends.cuda.backend import CudaBackend

    return CudaBackend(config)


def start_build(device: str = "cpu", backend: str = "auto") -> None:
    """Start what a backend builds on a first start (the CPU kernels' compile, on a thread of its own), so
    that it overlaps the imports and the tokenizer; a no-op where there is nothing to build."""
    if device in ("cpu", "auto") and backend == "auto":
        from kvloom.backends.cpu.build import prebuild_cpu_kernels

        prebuild_cpu_kernels()
