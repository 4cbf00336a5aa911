"""Rotary position embeddings with a cos/sin table built once for all positions up to max_model_len."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict:
    """The rope dict of a transformers config, whichever major version wrote it; of ``layer_type`` for
    families whose layer types rotate differently (Gemma 3: {"sliding_attention": ..., "full_attention":
    ...})."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    if layer_type is not None:
        params = params[layer_type]
    return params


def rotary_dim(hf_config: Any, head_dim: int, layer_type: str | None = None) -> int:
    """How many of a head's dimensions rotate (Phi-4-mini: 3/4 of them; the rest pass through)."""
    params = rope_parameters(hf_config, layer_type)
    factor = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    return head_dim if factor is None else int(head_dim * factor)


def inv_frequencies(
    hf_config: Any, head_dim: int, layer_type: str | None = None, max_positions: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim // 2], attention scaling) as transformers computes them.
    ``max_positions``: the context the tables serve; longrope takes its long factors when it is past the
    original context (as llama.cpp decides, by the context size: one set for every position)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = rotary_dim(hf_config, head_dim, layer_type)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        if "freq_factors" in params:  # a GGUF file's rope_freqs (Llama 3.1+ scaling as llama.cpp stores it)
            inv_freq = inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float)
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ValueError(
            "model: dynamic NTK rope scaling is not supported (it depends on the batch's length)"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"model: unsupported rope_type {rope_type!r}")
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    original = params.get("original_max_position_embeddings")
    if rope_type == "longrope" and max_positions is not None and original and max_positions > original:
        kwargs["seq_len"] = max_positions  # the long factors
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        hf_config: Any,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        layer_type: str | None = None,
    ) -> None:
        super().__init__()
        inv_freq, scaling = inv_frequencies(hf_config, head_dim, layer_type, max_positions)
        self.rotary_dim = 2 * inv_freq.shape[0]  # the first rotary_dim of each head rotate
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, rotary_dim]
        # NOTE: plain attributes, not buffers: the model is built on the meta device and materialized
        # with to_empty(), which must not touch these precomputed tables.
        self.cos = (emb.cos() * scaling).to(dtype)  # [max_positions, rotary_dim]
        self.sin = (emb.sin() * scaling).to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, rotary_dim]
        sin = self.sin[positions].unsqueeze(1)
        d = self.rotary_dim
        if d < q.shape[-1]:  # partial rotary: the rest of each head passes through
            q_rot, k_rot = q[..., :d], k[..., :d]
            q_rot = q_rot * cos + _rotate_half(q_rot) * sin
            k_rot = k_rot * cos + _rotate_half(k_rot) * sin
            return torch.cat((q_rot, q[..., d:]), dim=-1), torch.cat((k_rot, k[..., d:]), dim=-1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
