"""Mixture of experts: a router picks each token's top-k experts; the experts run grouped (the step's
tokens sorted by expert, one matmul pair per active expert, as vLLM's FusedMoE and llama.cpp's mul_mat_id
do) instead of every expert over every token."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvloom.distributed.parallel_state import get_tp
from kvloom.layers.linear import Linear
from kvloom.layers.mlp import MLP
from kvloom.layers.quantization import QuantizedWeight

# A checkpoint's per-expert weight: (the layer's experts, expert, which matrix)
EXPERT_WEIGHT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# matrix -> (the fused parameter, shard): gate and up stacked in gate_up_proj, down alone
EXPERT_PARAMS = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", 0),
    "down_proj": ("down_proj", 0),
}


class FusedExperts(nn.Module):
    """One layer's experts: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]; with tensor
    parallel each rank holds its share of I of every expert, and the caller sums the ranks' outputs."""

    cuda_graph_safe = False  # the forward reads each expert's token count on the host

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        tp = get_tp()
        self.num_experts = num_experts
        self.intermediate = n = intermediate // tp.size  # this rank's
        self.hidden = hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * n, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, n))
        self.act = MLP.ACTIVATIONS[act]
        # GGUF blocks kept as they are, (expert, parameter) -> shard -> weight, for a backend to run
        self.quantized: dict[tuple[int, str], dict[int, QuantizedWeight]] = {}
        # Set by a backend (backends/cpu): per expert, its (gate_up, down) Linear on the backend's method;
        # and ``fused(xs, counts)``, every expert's rows in one call (None for an input it does not take)
        self.linears: nn.ModuleList | None = None
        self.fused = None

    def as_linears(self, install: Callable[[Linear, QuantizedWeight | None], None]) -> None:
        """Give each expert its own (gate_up, down) Linear, ``install`` giving each its method (with the
        expert's GGUF blocks where it has them all; else its dense weight, blocks dequantized into it),
        and drop the stacked dense parameters."""
        pairs = []
        for e in range(self.num_experts):
            layers = []
            for param, out_features, in_features, shards in (
                ("gate_up_proj", 2 * self.intermediate, self.hidden, 2),
                ("down_proj", self.hidden, self.intermediate, 1),
            ):
                lin = Linear(in_features, out_features, bias=False, device="meta")
                blocks = self.quantized.pop((e, param), {})
                if len(blocks) == shards:
                    install(lin, QuantizedWeight.cat([blocks[i] for i in range(shards)]))
                else:
                    dense = getattr(self, param).data[e]
                    for i, qw in blocks.items():  # a shard of a type the backend does not run
                        dense.narrow(0, i * self.intermediate, self.intermediate).copy_(
                            qw.dequantize(dense.dtype)
                        )
                    lin.weight = nn.Parameter(dense, requires_grad=False)
                    install(lin, None)
                layers.append(lin)
            pairs.append(nn.ModuleList(layers))
        self.linears = nn.ModuleList(pairs)
        self.gate_up_proj = self.down_proj = None

    def checkpoint_slice(self, matrix: str) -> tuple[int, int, int] | None:
        """This rank's part of an expert's checkpoint matrix (rows of gate/up, columns of down)."""
        tp = get_tp()
        if tp.size == 1:
            return None
        dim = 1 if EXPERT_PARAMS[matrix][0] == "down_proj" else 0
        return dim, tp.rank * self.intermediate, self.intermediate

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, experts [T, k] -> sum over each token's k experts of weight * expert(x)."""
        k = experts.shape[1]
        flat = experts.flatten()  # [T * k]
        order = flat.argsort(stable=True)  # rows grouped by expert
        rows = order // k  # the token of each grouped row
        counts = torch.bincount(flat, minlength=self.num_experts)
        xs = x[rows]  # [T * k, H]
        out = self.fused(xs, counts) if self.fused is not None else None
        if out is None:
            out = self._experts_one_by_one(xs, counts)
        scaled = (out * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, rows, scaled)

    def _experts_one_by_one(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        # NOTE: one host copy per layer: how many rows each expert takes
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end = start + count
            if self.linears is not None:
                gate_up_proj, down_proj = self.linears[e]
                gate, up = gate_up_proj(xs[start:end]).split(self.intermediate, dim=-1)
                out[start:end] = down_proj(self.act(gate) * up)
            else:
                gate_up = xs[start:end] @ self.gate_up_proj[e].t()  # [count, 2I]
                gate, up = gate_up.split(self.intermediate, dim=-1)
                out[start:end] = (self.act(gate) * up) @ self.down_proj[e].t()
            start = end
        return out


class SparseMoeBlock(nn.Module):
    """The MLP of a mixture-of-experts layer: router, experts, and (Qwen2-MoE) a shared expert whose
    output is gated by a sigmoid.

    ``renormalize``: the top-k probabilities are divided by their sum (Mixtral, and Qwen / OLMoE where
    the config's norm_topk_prob says)."""

    def __init__(
        self,
        config: Any,
        num_experts: int,
        top_k: int,
        intermediate: int,
        renormalize: bool,
        shared_intermediate: int | None = None,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(config.hidden_size, num_experts, bias=False)  # whole on every rank
        act = getattr(config, "hidden_act", "silu")
        self.experts = FusedExperts(num_experts, config.hidden_size, intermediate, act)
        self.shared_expert = None
        if shared_intermediate:
            self.shared_expert = MLP(config, shared_intermediate)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    # Set by a backend (backends/cpu: KernelMoe): router, top-k and experts in one call, or None for an
    # input it does not take
    fused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x) if self.fused is not None else None
        if y is None:
            logits = self.gate(x)  # [T, E]
            probs = torch.softmax(logits.float(), dim=-1)
            weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            y = self.experts(x, weights, experts)
        y = get_tp().all_reduce(y)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class MoeWeights:
    """For model classes with SparseMoeBlock layers (mixed in before LlamaForCausalLM): per-expert
    checkpoint tensors go into the layer's stacked expert parameters, each rank reading its share."""

    # checkpoint name piece -> kvloom's (Mixtral's block_sparse_moe is kvloom's mlp)
    RENAMES: dict[str, str] = {}

    def _renamed(self, name: str) -> str:
        for old, new in self.RENAMES.items():
            name = name.replace(old, new)
        return name

    def checkpoint_slice(self, name: str) -> tuple[int, int, int] | None:
        m = EXPERT_WEIGHT.match(self._renamed(name))
        if m is not None:
            return self.get_submodule(m.group(1)).checkpoint_slice(m.group(3))
        return super().checkpoint_slice(self._renamed(name))

    def load_weights(self, weights: Any) -> None:
        super().load_weights((self._renamed(name), tensor) for name, tensor in weights)

    def load_other(self, name: str, tensor: Any, params: dict) -> tuple[str, int] | None:
        m = EXPERT_WEIGHT.match(name)
        if m is None:
            return None
        experts: FusedExperts = self.get_submodule(m.group(1))
        e, (param, shard) = int(m.group(2)), EXPERT_PARAMS[m.group(3)]
        shards = 2 if param == "gate_up_proj" else 1
        if isinstance(tensor, QuantizedWeight):  # GGUF blocks, for the backend (FusedExperts.as_linears)
            experts.quantized.setdefault((e, param), {})[shard] = tensor
            return f"{m.group(1)}.{param}", e * shards + shard
        dst = getattr(experts, param).data[e]
        if param == "gate_up_proj":
            dst = dst.narrow(0, shard * experts.intermediate, experts.intermediate)
        if dst.shape != tensor.shape:
            raise ValueError(f"model: {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        return f"{m.group(1)}.{param}", e * shards + shard

    def num_shards(self, param: str) -> int:
        parts = param.rsplit(".", 2)
        if len(parts) == 3 and parts[1] == "experts":
            experts = self.get_submodule(parts[0] + ".experts")
            return experts.num_experts * (2 if parts[2] == "gate_up_proj" else 1)
        return super().num_shards(param)
