"""Qwen3-MoE: Qwen3's attention (per-head q/k norms); experts on the layers decoder_sparse_step picks."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvloom.layers.moe import MoeWeights
from kvloom.models.qwen2_moe import qwen_moe_mlp
from kvloom.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(MoeWeights, Qwen3ForCausalLM):
    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        return qwen_moe_mlp(config, layer)
