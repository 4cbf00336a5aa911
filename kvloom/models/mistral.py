"""Mistral: Llama with sliding-window attention."""

from __future__ import annotations

from typing import Any

from kvloom.models.llama import AttentionOptions, LlamaForCausalLM, layer_window


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        return AttentionOptions(
            qkv_bias=False, o_bias=False, qk_norm=False, window=layer_window(config, layer)
        )
