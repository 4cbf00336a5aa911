from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that, once packed for the CPU kernels, multiplies with the packed copy of its weight.

    Packing replaces the weight (no second copy is kept): after `pack`, `weight` is None.
    """

    kernels = None  # a kvloom.kernels.CpuKernels once packed

    def pack(self, kernels) -> None:
        self.packed = kernels.pack_linear_weight(self.weight.data)
        self.weight = None
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.linear(x, self.packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)
