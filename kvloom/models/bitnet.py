"""BitNet b1.58 (transformers' ``bitnet``): Llama's layer with a norm of the attention output before o_proj
(attn_sub_norm) and of act(gate) * up before down_proj (ffn_sub_norm), and relu^2 as the activation. Its
linear layers (all but the output layer) are ternary: weights in {-1, 0, 1} times one scale per tensor,
inputs quantized to int8 per token as they come (BitLinear). kvloom runs them as kind-9 (W8A8) weights:
the same integer products (quantization/bitnet.py reads the checkpoint)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvloom.layers.mlp import MLP
from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import RotaryEmbedding
from kvloom.models.llama import Attention, AttentionOptions, DecoderLayer, LlamaForCausalLM


class BitNetAttention(Attention):
    def __init__(self, config: Any, opts: AttentionOptions, rotary: RotaryEmbedding) -> None:
        super().__init__(config, opts, rotary)
        self.attn_sub_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        o = self.impl.forward(self, positions, self.qkv_proj(x), kv_cache, meta)
        return self.o_proj(self.attn_sub_norm(o))


class BitNetMLP(MLP):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.ffn_sub_norm = RMSNorm(self.intermediate_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.ffn_sub_norm(self.ACTIVATIONS[self.act](gate) * up))


class BitNetDecoderLayer(DecoderLayer):
    attention_class = BitNetAttention


class BitNetForCausalLM(LlamaForCausalLM):
    layer_class = BitNetDecoderLayer

    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        return BitNetMLP(config)
