"""Verification of proposed tokens against the target model's rows (speculative decoding).

A request that proposed d_1..d_k is scored at k + 1 rows in one forward pass: row j holds the target's
distribution p_j of the token after d_1..d_j. Greedy requests accept proposals while they equal the
target's argmax and then emit the target's own token, so the output is exactly the one without
speculation. With temperature > 0, proposal d_j (drawn from the proposer's q_j) is accepted with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is drawn from the residual
norm(max(0, p_j - q_j)) and the rest are dropped (Leviathan et al. 2023, Chen et al. 2023). This keeps
every emitted token distributed exactly as the target's p. When all k are accepted, the last row gives
one more token, drawn from p_k. A proposer without a distribution (ngram) is a point mass: q_j(d_j) = 1.
"""

from __future__ import annotations

import torch


def verify(
    target_tokens: list[int],
    proposals: list[int],
    greedy: bool,
    target_probs: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens to emit: the accepted proposals, then one token of the target's.

    ``target_tokens``: the target's own draw at each of the k + 1 rows (its argmax when greedy), each
    from p_j. ``target_probs`` [k + 1, vocab]: the distributions p_j (not needed when greedy).
    ``draft_probs`` [k, vocab]: q_j, or None for point-mass proposals.
    """
    k = len(proposals)
    if len(target_tokens) != k + 1:
        raise ValueError(f"need {k + 1} target tokens for {k} proposals, got {len(target_tokens)}")
    if greedy:
        out = []
        for j, d in enumerate(proposals):
            out.append(target_tokens[j])
            if d != target_tokens[j]:
                return out
        out.append(target_tokens[k])
        return out
    assert target_probs is not None
    d = torch.tensor(proposals, dtype=torch.long, device=target_probs.device)
    rows = torch.arange(k, device=target_probs.device)
    p = target_probs[rows, d]
    q = draft_probs[rows, d] if draft_probs is not None else torch.ones_like(p)
    u = torch.rand(k, generator=generator, device=target_probs.device)
    # u < p / q, written without the division (q > 0: d was drawn from q).
    accepted = (u * q < p).to(torch.long).cumprod(0)
    a = int(accepted.sum())
    if a == k:
        return [*proposals, target_tokens[k]]
    if draft_probs is not None:
        residual = (target_probs[a] - draft_probs[a]).clamp_min(0.0)
    else:
        residual = target_probs[a].clone()
        residual[d[a]] = 0.0
    if not residual.sum() > 0:  # p_a <= q_a everywhere (equal up to rounding): p_a itself is the residual
        residual = target_probs[a]
    token = int(torch.multinomial(residual, 1, generator=generator))
    return [*proposals[:a], token]
