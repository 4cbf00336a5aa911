from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """How a Linear computes ``x @ W.T + b``. This base is PyTorch on the layer's own weight, the
    reference every device runs; a backend gives a layer a method of its own that holds the weight in
    the backend's form (kvloom/backends/cpu: packed bf16 or quantized blocks). The layer never asks which.
    """

    weight_format = "bf16"  # what the weight is (bf16, q4, q8): logged, tested

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is its method's (``LinearMethod``): a backend may replace the method, and
    with it the weight (the plain weight is then None: no second copy is kept)."""

    method: LinearMethod = LinearMethod()

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint. (On the meta device, nn.init's
        normal_ goes through torch's reference ops, which import torch._dynamo: 1 s of start-up.)"""

    @property
    def quant(self) -> str:
        return self.method.weight_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        """No random init (see Linear.reset_parameters)."""
