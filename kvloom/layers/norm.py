from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, exactly as transformers' Llama does.

    Called with a residual, it first adds x to it and returns (normalized sum, sum): the pre-norm decoder's
    residual stream, fused into one pass by the CPU kernels (which update the residual in place).
    """

    kernels = None  # a kvloom.backends.cpu.kernels.CpuKernels once the model runner turns them on

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        k = self.kernels
        if k is not None and k.rms_norm_ok(x) and (residual is None or k.rms_norm_ok(residual)):
            out = k.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
