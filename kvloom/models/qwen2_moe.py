"""Qwen2-MoE: Qwen2's attention; experts with a sigmoid-gated shared expert, on the layers that
decoder_sparse_step picks and mlp_only_layers leaves alone (those keep a dense MLP)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvloom.layers.mlp import MLP
from kvloom.layers.moe import MoeWeights, SparseMoeBlock
from kvloom.models.qwen2 import Qwen2ForCausalLM


def moe_layer(config: Any, layer: int) -> bool:
    """Whether the layer's MLP is a mixture of experts (Qwen2-MoE and Qwen3-MoE configs)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = getattr(config, "mlp_only_layers", None) or []
    return config.num_experts > 0 and layer not in only and (layer + 1) % step == 0


def qwen_moe_mlp(config: Any, layer: int) -> nn.Module:
    if not moe_layer(config, layer):
        return MLP(config)
    return SparseMoeBlock(
        config,
        config.num_experts,
        config.num_experts_per_tok,
        config.moe_intermediate_size,
        bool(getattr(config, "norm_topk_prob", False)),
        getattr(config, "shared_expert_intermediate_size", None),
    )


class Qwen2MoeForCausalLM(MoeWeights, Qwen2ForCausalLM):
    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        return qwen_moe_mlp(config, layer)
