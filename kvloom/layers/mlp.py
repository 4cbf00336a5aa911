"""The gated MLP of most families: down(act(gate(x)) * up(x)), gate and up in one matmul."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.distributed.parallel_state import get_tp
from kvloom.layers.linear import Linear, column_parallel, row_parallel


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), act silu (Llama and most families) or tanh-approximated gelu (Gemma)."""

    # Set by a backend (backends/cpu: KernelActMul): act(gate) * up in one pass, or None for an input it
    # does not take (then the PyTorch ops below run).
    fused_act = None
    ACTIVATIONS = {
        "silu": F.silu,
        "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
        "relu2": lambda x: F.relu(x).square(),  # BitNet
    }

    def __init__(self, config: Any, intermediate_size: int | None = None) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        tp = get_tp()
        self.intermediate_size = n = (intermediate_size or config.intermediate_size) // tp.size  # this rank's
        self.gate_up_proj = column_parallel(
            Linear(config.hidden_size, 2 * n, bias=bias), [(tp.rank * n, n)] * 2
        )
        self.down_proj = row_parallel(Linear(n, config.hidden_size, bias=bias))
        self.act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        if self.act not in self.ACTIVATIONS:
            raise ValueError(f"model: activation {self.act!r} is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_act is not None:
            h = self.fused_act(gate_up)
            if h is not None:
                return self.down_proj(h)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.ACTIVATIONS[self.act](gate) * up)
