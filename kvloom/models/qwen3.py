"""Qwen3: per-head RMSNorm on q and k before rotary; bias as attention_bias says."""

from __future__ import annotations

from typing import Any

from kvloom.models.llama import AttentionOptions, LlamaForCausalLM, layer_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, window=layer_window(config, layer))
