"""OLMoE: RMSNorm over the whole q and k projections (not per head), optional clipping of q/k/v, and a
mixture of experts in every layer (top-k of softmax, renormalized where norm_topk_prob says)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvloom.distributed.parallel_state import get_tp
from kvloom.layers.moe import MoeWeights, SparseMoeBlock
from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import RotaryEmbedding
from kvloom.models.llama import Attention, AttentionOptions, DecoderLayer, LlamaForCausalLM


class OlmoeAttention(Attention):
    standard_qk = False

    def __init__(self, config: Any, opts: AttentionOptions, rotary: RotaryEmbedding) -> None:
        super().__init__(config, opts, rotary)
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)
        self.clip = getattr(config, "clip_qkv", None)

    def split_qkv(
        self, positions: torch.Tensor, qkv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        return (*self.rotary(positions, q, k), v)


class OlmoeDecoderLayer(DecoderLayer):
    attention_class = OlmoeAttention


class OlmoeForCausalLM(MoeWeights, LlamaForCausalLM):
    layer_class = OlmoeDecoderLayer

    def __init__(
        self, config: Any, max_positions: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        if get_tp().size > 1:
            raise ValueError("model: OLMoE's q/k norms span every head; it does not run with tensor parallel")
        super().__init__(config, max_positions, dtype, device)

    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=False, window=None)

    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        renormalize = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(
            config, config.num_experts, config.num_experts_per_tok, config.intermediate_size, renormalize
        )
