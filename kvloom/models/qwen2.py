"""Qwen2 / Qwen2.5: bias on q/k/v (not o), optional per-layer sliding window, tied or untied embeddings."""

from __future__ import annotations

from typing import Any

from kvloom.models.llama import AttentionOptions, LlamaForCausalLM, layer_window


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        return AttentionOptions(
            qkv_bias=True, o_bias=False, qk_norm=False, window=layer_window(config, layer)
        )
