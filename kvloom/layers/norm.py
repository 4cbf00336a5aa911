from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, exactly as transformers' Llama does.

    Called with a residual, it first adds x to it and returns (normalized sum, sum): the pre-norm decoder's
    residual stream. A backend may give it ``fused``, one pass for both: ``fused(x, residual, weight, eps)``
    returns the normalized rows and updates ``residual`` in place to the sum, or returns None for an input
    it does not take (then the PyTorch path below runs).
    """

    fused = None  # set by a backend (backends/cpu: KernelRMSNorm)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            # per-head norms ([tokens, heads, head_dim]) go as rows of head_dim (a copy if strided)
            rows = x if x.dim() == 2 or residual is not None else x.reshape(-1, x.shape[-1])
            out = self.fused(rows, residual, self.kernel_weight, self.eps)
            if out is not None:
                return out.view(x.shape) if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def divide_weight(self, s: torch.Tensor) -> torch.Tensor:
        """Divide the output's per-channel scale by ``s`` (SmoothQuant); returns the ratio old / new that the
        rounded weight applies ([dim] fp32: ``s`` up to rounding, 1 where the weight is 0)."""
        old = self.weight.data.float().clone()  # NOTE: a copy: .float() of an fp32 weight is the weight
        new = (old / s).to(self.weight.dtype)
        self.weight.data.copy_(new)
        return torch.where(new != 0, old / new.float(), torch.ones_like(old))

    @property
    def kernel_weight(self) -> torch.Tensor:
        """The weight a fused kernel multiplies by (the kernel computes as transformers' Llama does)."""
        return self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
