"""Vectorized sampling over the batch: one pass over [batch, vocab] per step, one host copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.sampling_params import SamplingParams


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [batch] float; 0 = greedy
    top_k: torch.Tensor  # [batch] long; vocab size when disabled
    top_p: torch.Tensor  # [batch] float
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> SamplingTensors:
        temperature = [p.temperature for p in params]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            all_greedy=all(t == 0.0 for t in temperature),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
        )


def sample(logits: torch.Tensor, t: SamplingTensors, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [batch, vocab] float32 -> token ids [batch]."""
    greedy = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy
    is_greedy = t.temperature == 0.0
    logits = logits / torch.where(is_greedy, 1.0, t.temperature)[:, None]

    if t.any_top_k or t.any_top_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        if t.any_top_k:
            ranks = torch.arange(vocab, device=logits.device)[None, :]
            sorted_logits = sorted_logits.masked_fill(ranks >= t.top_k[:, None], float("-inf"))
        if t.any_top_p:
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            sorted_logits = sorted_logits.masked_fill(mass_before >= t.top_p[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, sorted_idx, sorted_logits)

    probs = logits.softmax(dim=-1)
    # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) samples from p.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)
