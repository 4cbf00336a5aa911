"""Speculative decoding parts on their own: the verification rule's distribution, prompt lookup, adaptive k,
and the scheduler's handling of proposed tokens (budget, rollback of rejected ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvloom.spec.proposers import NgramProposer, StepCost, expected_tokens, ngram_lookup
from kvloom.spec.verify import verify

from .helpers import make_request, make_scheduler

P = torch.tensor(
    [
        [0.50, 0.20, 0.15, 0.10, 0.05, 0.00],
        [0.05, 0.05, 0.60, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],
    ]
)
# A draft that disagrees: most of its mass where the target has little.
Q = torch.tensor(
    [
        [0.05, 0.05, 0.05, 0.05, 0.80, 0.00],
        [0.70, 0.10, 0.05, 0.05, 0.05, 0.05],
    ]
)


def _first_token_frequencies(draft_probs: torch.Tensor | None, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(P.shape[1])
    for _ in range(n):
        if draft_probs is None:
            proposals = [4, 0]  # point masses (ngram) on unlikely tokens
        else:
            proposals = [int(torch.multinomial(draft_probs[j], 1, generator=g)) for j in range(2)]
        target = [int(torch.multinomial(P[j], 1, generator=g)) for j in range(3)]
        out = verify(target, proposals, False, P, draft_probs, g)
        assert 1 <= len(out) <= 3 and out[:-1] == proposals[: len(out) - 1]
        counts[out[0]] += 1
    return counts / n


@pytest.mark.parametrize("draft_probs", [Q, None], ids=["draft", "point-mass"])
def test_verification_keeps_the_target_distribution(draft_probs):
    freq = _first_token_frequencies(draft_probs)
    # 20000 draws: the standard error of each frequency is below 0.0036
    assert (freq - P[0]).abs().max() < 0.015, freq
    # the rule matters: the draft's own distribution is far from the target's
    if draft_probs is not None:
        assert (draft_probs[0] - P[0]).abs().max() > 0.4


def test_greedy_verification_is_prefix_matching():
    assert verify([5, 6, 7, 8], [5, 6, 7], True) == [5, 6, 7, 8]
    assert verify([5, 6, 7, 8], [5, 9, 7], True) == [5, 6]
    assert verify([5, 6], [4], True) == [5]
    with pytest.raises(ValueError, match="target tokens"):
        verify([5], [4], True)


def test_ngram_lookup_takes_the_latest_longest_match():
    t = np.array([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    # the 2-gram (2, 3) last occurred at 5-6, followed by 5, 7
    assert ngram_lookup(t, 2, 1, 3) == [5, 7]
    # a longer suffix wins over a later short one: (9, 2, 3) ... (x, 2, 3)
    t = np.array([9, 2, 3, 8, 8, 1, 2, 3, 6, 9, 2, 3])
    assert ngram_lookup(t, 3, 1, 3) == [8, 8, 1]
    assert ngram_lookup(np.array([1, 2, 3]), 2, 1, 3) == []  # nothing repeats
    assert ngram_lookup(np.array([4, 4]), 3, 1, 2) == [4]  # continuation is cut at the end


def test_adaptive_k_follows_acceptance():
    assert expected_tokens(0.0, 3) == 1.0 and expected_tokens(1.0, 3) == 4.0
    p = NgramProposer(5, 1000, 1, 3)
    r = make_request("a", 10, max_tokens=100)
    assert 1 <= p.num_tokens_for(r) < 5  # no history: a prior rate of 1/2
    p._accepted["a"] = (40.0, 40.0)
    assert p.num_tokens_for(r) == 5  # everything accepted: propose all
    p._accepted["a"] = (0.0, 40.0)  # nothing accepted for a long time
    ks = [p.num_tokens_for(r) for _ in range(40)]
    assert [i for i, k in enumerate(ks) if k] == [7, 23]  # paused; probes after 8 steps, then 16
    assert set(ks) == {0, 2}
    for _ in range(5):
        p.step_cost.add(1.0, 0.010)  # 10 ms decode steps
    p._pass_time = 0.003  # a draft pass costs 30% of a target step
    p._accepted["a"] = (20.0, 30.0)
    assert 1 <= p.num_tokens_for(r) < 5  # 2/3 accepted: a few tokens pay, five do not
    p._accepted["a"] = (40.0, 41.0)
    assert p.num_tokens_for(r) == 5
    p._pass_time = 0.009  # as dear as the target: even 95% acceptance gains less than 5%
    assert p.num_tokens_for(r) == 0
    # never past max_tokens (the step emits up to k + 1) or max_model_len
    r.output_token_ids = [7] * 97
    assert NgramProposer(5, 1000, 1, 3).num_tokens_for(r) == 2
    assert NgramProposer(5, r.num_tokens + 2, 1, 3).num_tokens_for(r) == 1


def test_step_cost_fit():
    c = StepCost()
    assert c.row_cost() == pytest.approx(0.05)  # nothing measured: the default
    c.add(3, 0.013)
    assert c.base() == pytest.approx(0.013 / 1.1)  # no plain step yet: the default row cost taken out
    for x in [1, 4, 2, 6, 1, 3, 1]:
        c.add(x, 0.010 + 0.001 * x)  # 11 ms with one row per request, +1 ms per row
    c.add(1, 0.5)  # a stall
    c.add(5, 0.9)
    assert c.base() == pytest.approx(0.011)
    assert c.row_cost() == pytest.approx(1 / 11)


def test_scheduler_verifies_proposals_and_rolls_back_rejected_ones():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=64)
    r = make_request("a", 6, max_tokens=20)
    sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, {"a": [10]})
    assert (r.num_computed_tokens, r.num_tokens) == (6, 7)
    out = sched.schedule({"a": ([11, 12, 13, 14], None)})
    (s,) = out.scheduled
    assert (s.start, s.num_new_tokens, s.num_spec, s.samples) == (6, 5, 4, True)
    assert len(s.block_ids[0]) == 3  # 11 tokens
    # two proposals accepted, then the target's token: 12 tokens are known, 9 + 1 computed
    sched.update_from_output(out, {"a": [11, 12, 20]})
    assert r.output_token_ids == [10, 11, 12, 20]
    assert r.num_computed_tokens == 9 and r.spec_token_ids == []
    assert len(sched.kv.get_block_ids("a")[0]) == 3  # 9 computed tokens need 3 blocks: none to free
    out = sched.schedule({"a": ([21, 22], None)})
    sched.update_from_output(out, {"a": [30]})  # all rejected
    assert r.num_computed_tokens == 10 and len(sched.kv.get_block_ids("a")[0]) == 3


def test_scheduler_drops_proposals_past_the_budget_and_stops_mid_list():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=3)
    r = make_request("a", 2, max_tokens=4)
    sched.add_request(r)
    sched.update_from_output(sched.schedule(), {"a": [10]})
    out = sched.schedule({"a": ([11, 12, 13, 14], None)})
    assert out.scheduled[0].spec_token_ids == [11, 12] and r.spec_token_ids == [11, 12]
    # max_tokens 4: the fourth token finishes the request and the fifth is dropped
    finished = sched.update_from_output(out, {"a": [11, 12, 13, 14]})
    assert finished == [r] and r.output_token_ids == [10, 11, 12, 13]
    assert sched.kv.num_free_blocks == 16
