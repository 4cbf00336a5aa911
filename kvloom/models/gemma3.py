"""Gemma 3 (text): local sliding-window layers and global layers (every sixth), each kind with its own
rotary base; q/k norms; norms before and after attention and the MLP; embeddings scaled by
sqrt(hidden_size); GeGLU (tanh gelu); final logit soft-capping where the config has it. Gemma's norms
scale by (1 + weight), in float32."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import RotaryEmbedding
from kvloom.models.llama import Attention, AttentionOptions, DecoderLayer, LlamaForCausalLM


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), all in float32 and cast back last (transformers' Gemma3RMSNorm). Called
    with a residual, it first adds x to it and returns (normalized sum, sum), as RMSNorm does.

    NOTE: a backend's fused norm (bf16 on the CPU kernels) computes Llama's way with 1 + weight rounded to
    bf16: within bf16's rounding of HF's result, one kernel call in place of ten ops (Gemma 3 270M decode:
    six norms in each of 18 layers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.zeros(dim))
        self._plus_one: torch.Tensor | None = (
            None  # 1 + weight in its dtype, made on first use (after loading)
        )

    def divide_weight(self, s: torch.Tensor) -> torch.Tensor:
        """RMSNorm's, on the scale 1 + weight. NOTE: 1 + weight near 0 has few bits left in bf16: s stays
        within 32x of the scale, and a channel whose new scale would round to 0 keeps its old one."""
        old = 1.0 + self.weight.data.float()
        s = torch.minimum(s, 32 * old.abs().clamp(min=1e-3))
        new_w = (old / s - 1.0).to(self.weight.dtype)
        new = 1.0 + new_w.float()
        keep = new == 0
        self.weight.data.copy_(torch.where(keep, self.weight.data, new_w))
        self._plus_one = None
        return torch.where(keep, torch.ones_like(old), old / torch.where(keep, old, new))

    @property
    def kernel_weight(self) -> torch.Tensor:
        if self._plus_one is None:
            self._plus_one = (1.0 + self.weight.float()).to(self.weight.dtype)
        return self._plus_one

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(Attention):
    norm_class = GemmaRMSNorm


class Gemma3DecoderLayer(DecoderLayer):
    """Llama's layer with Gemma's norms and attention, and two more norms: after attention (before the
    residual add) and after the MLP."""

    attention_class = GemmaAttention
    norm_class = GemmaRMSNorm
    output_norms = True

    def __init__(self, config: Any, opts: AttentionOptions, rotary: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__(config, opts, rotary, mlp)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def mlp_norm(self) -> nn.Module:
        return self.pre_feedforward_layernorm

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.enter(h, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, x, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer
    norm_class = GemmaRMSNorm

    def __init__(
        self, config: Any, max_positions: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("model: attention logit soft-capping (Gemma 2) is not supported")
        super().__init__(config, max_positions, dtype, device)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        kind = config.layer_types[layer]
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            window=config.sliding_window if kind == "sliding_attention" else None,
            scale=config.query_pre_attn_scalar**-0.5,
            rope=kind,
        )

    @classmethod
    def rotary_tables(
        cls, config: Any, head_dim: int, max_positions: int, dtype: torch.dtype
    ) -> dict[str, RotaryEmbedding]:
        kinds = sorted(set(config.layer_types))
        return {k: RotaryEmbedding(config, head_dim, max_positions, dtype, layer_type=k) for k in kinds}

    @classmethod
    def embedding_scale(cls, config: Any) -> float | None:
        return config.hidden_size**0.5

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        if logits is not None and self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
