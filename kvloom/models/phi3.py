"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's layers; checkpoints keep q/k/v and gate/up fused; longrope
(short or long factors, chosen by the context length as llama.cpp does); partial rotary where the config
has it (Phi-4-mini: 3/4 of each head); a sliding window over every layer where the config sets one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from kvloom.layers.quantization import QuantizedWeight
from kvloom.models.llama import AttentionOptions, LlamaForCausalLM

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        window = getattr(config, "sliding_window", None)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=False, window=window)

    def checkpoint_slice(self, name: str) -> tuple[int, int, int] | None:
        if name.rsplit(".", 2)[-2] in _FUSED:
            return None  # read whole, then split into its parts and sliced (load_weights)
        return super().checkpoint_slice(name)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(self._split(weights))

    def _split(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The fused checkpoint tensors as their parts (the names Llama's loader takes), each cut to this
        rank's slice."""
        a, n = self.model.layers[0].self_attn, self.config.intermediate_size
        heads = self.config.num_attention_heads * a.head_dim
        kv = self.config.num_key_value_heads * a.head_dim
        sizes = {"qkv_proj": [heads, kv, kv], "gate_up_proj": [n, n]}
        for name, tensor in weights:
            module, param = name.rsplit(".", 2)[-2:]
            if module not in _FUSED or isinstance(tensor, QuantizedWeight):
                yield name, tensor
                continue
            layer = self.get_submodule(name.rsplit(".", 1)[0])
            for i, (part, piece) in enumerate(zip(_FUSED[module], tensor.split(sizes[module]), strict=True)):
                if layer.shard_slices is not None:
                    dim, start, length = layer.shard_slices[i]
                    piece = piece.narrow(dim, start, length) if piece.dim() > dim else piece
                yield name.replace(f".{module}.", f".{part}."), piece.contiguous()
