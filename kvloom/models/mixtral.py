"""Mixtral: Mistral's attention; every layer's MLP a mixture of experts (top-k of softmax, renormalized)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kvloom.layers.moe import MoeWeights, SparseMoeBlock
from kvloom.models.mistral import MistralForCausalLM


class MixtralForCausalLM(MoeWeights, MistralForCausalLM):
    RENAMES = {".block_sparse_moe.": ".mlp."}

    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        return SparseMoeBlock(
            config, config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, True
        )
