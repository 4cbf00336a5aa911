"""Applying xgrammar-layout token bitmasks (int32 words, bit j of word w allows token 32 w + j) to logits.

Torch only, any dtype and device: the model runner masks the logits of constrained rows before sampling,
so every sampling path (greedy argmax, the kernels' bf16 argmax, top-k/p, speculative verification) sees
only the tokens the grammar allows.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32 -> [rows, V] bool."""
    bits = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, logit_rows: list[int], mask_rows: list[int]
) -> None:
    """Set to -inf, in place, the logits of tokens that row mask_rows[i] of ``bitmask`` forbids in row
    logit_rows[i] of ``logits``."""
    if not logit_rows:
        return
    index = torch.tensor(logit_rows, dtype=torch.long, device=logits.device)
    allowed = allowed_tokens(
        bitmask[torch.tensor(mask_rows, dtype=torch.long)].to(logits.device), logits.shape[1]
    )
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
