from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.layers.quantization import QuantizedWeight


class Linear(nn.Linear):
    """nn.Linear that, once packed for the CPU kernels, multiplies with its packed weight: the bf16 weight
    in the kernels' layout, or a group-quantized one (kvloom/layers/quantization.py) kept quantized.

    Packing replaces the weight (no second copy is kept): after `pack`, `weight` is None.
    """

    kernels = None  # a kvloom.backends.cpu.kernels.CpuKernels once packed
    quant: str = "bf16"  # what the packed weight is: bf16, q4 or q8 (logged, tested)

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint. (On the meta device, nn.init's
        normal_ goes through torch's reference ops, which import torch._dynamo: 1 s of start-up.)"""

    def pack(self, kernels, quantized: QuantizedWeight | None = None) -> None:
        if quantized is None:
            self.packed = kernels.pack_linear_weight(self.weight.data)
            self.desc = kernels.linear_desc(self.packed, self.bias)
        else:
            if quantized.shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"model: quantized weight of shape {quantized.shape} for a "
                    f"{self.out_features}x{self.in_features} layer"
                )
            self.packed = quantized.pack()
            self.desc = kernels.linear_desc(self.packed, self.bias, quantized.kind, quantized.group)
            self.quant = f"q{quantized.kind}"
        self.weight = None
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.run_linear(self.desc, x, self.in_features, self.out_features)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        """No random init (see Linear.reset_parameters)."""
