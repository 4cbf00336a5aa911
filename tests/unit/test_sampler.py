"""The sampler on fixed logits: distributions, penalties, logit bias, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from kvloom.layers.sampler import SamplingBatch, apply_penalties, sample
from kvloom.request import Request
from kvloom.sampling_params import SamplingParams

LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]


def requests(params: SamplingParams, n: int, prompt=(0,), output=(), eos=frozenset()) -> list[Request]:
    return [
        Request(f"r{i}", list(prompt), params, eos_token_ids=eos, output_token_ids=list(output))
        for i in range(n)
    ]


def expected_distribution(temperature: float, top_k: int, top_p: float, min_p: float) -> list[float]:
    """Written out by hand, independently of the sampler: scale, min_p, top_k, top_p, renormalize."""
    z = [x / temperature for x in LOGITS]
    e = [math.exp(x) for x in z]
    p = [x / sum(e) for x in e]
    keep = [q >= min_p * max(p) for q in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    if top_k > 0:
        for rank, i in enumerate(order):
            keep[i] = keep[i] and rank < top_k
    kept = [p[i] if keep[i] else 0.0 for i in range(len(p))]
    total = sum(kept)
    kept = [x / total for x in kept]
    if top_p < 1.0:
        mass = 0.0
        for i in order:
            if mass >= top_p:
                kept[i] = 0.0
            mass += kept[i]
        total = sum(kept)
        kept = [x / total for x in kept]
    return kept


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, -1, 1.0, 0.0),
        (0.5, -1, 1.0, 0.0),
        (2.0, -1, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0),
        (1.0, -1, 0.8, 0.0),
        (1.0, -1, 1.0, 0.2),
        (0.7, 5, 0.9, 0.05),
    ],
)
def test_sampled_distribution_matches_the_analytic_one(temperature, top_k, top_p, min_p):
    n = 200_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    batch = SamplingBatch.build(requests(params, n), len(LOGITS), torch.device("cpu"))
    logits = torch.tensor([LOGITS] * n)
    tokens = sample(logits, batch, torch.Generator().manual_seed(1234)).tokens
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    expected = torch.tensor(expected_distribution(temperature, top_k, top_p, min_p), dtype=torch.double)
    # Tokens outside the support are never drawn; the rest is within a total-variation distance that
    # sampling noise reaches with negligible probability (std of each frequency <= 0.0012 here), while
    # dropping or keeping one token too many moves it by at least 0.03.
    assert torch.all(freq[expected == 0] == 0)
    assert 0.5 * (freq - expected).abs().sum() < 0.01
    # The test can fail: the plain softmax is far from every truncated distribution used above.
    if (top_k, top_p, min_p) != (-1, 1.0, 0.0):
        plain = torch.tensor(expected_distribution(temperature, -1, 1.0, 0.0), dtype=torch.double)
        assert 0.5 * (plain - expected).abs().sum() > 0.03


def test_penalties_follow_the_openai_and_vllm_definitions():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    reqs = requests(params, 1, prompt=[0], output=[1, 2, 2])
    batch = SamplingBatch.build(reqs, 5, torch.device("cpu"))
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5]])
    got = apply_penalties(logits, batch)[0].tolist()
    # token 0: in the prompt, positive -> / 2. token 1: generated once, negative -> * 2, then
    # - 0.5 * 1 - 0.25. token 2: generated twice -> / 2, then - 0.5 * 2 - 0.25. tokens 3, 4: unseen.
    assert got == pytest.approx([0.5, -2.0 - 0.5 - 0.25, 1.0 - 1.0 - 0.25, 0.5, -0.5])


def test_repetition_penalty_alone_ignores_counts_and_rows_without_penalties_are_untouched():
    a = requests(SamplingParams(repetition_penalty=1.5), 1, prompt=[3], output=[3, 3])
    b = requests(SamplingParams(), 1, prompt=[3], output=[3, 3])
    batch = SamplingBatch.build(a + b, 4, torch.device("cpu"))
    logits = torch.tensor([[0.3, 0.2, 0.1, 3.0]] * 2)
    got = apply_penalties(logits, batch).tolist()
    assert got[0] == pytest.approx([0.3, 0.2, 0.1, 2.0])
    assert got[1] == pytest.approx([0.3, 0.2, 0.1, 3.0])


def test_logit_bias_and_min_tokens_steer_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    reqs = [
        *requests(SamplingParams(temperature=0, logit_bias={3: 100}), 1),
        *requests(SamplingParams(temperature=0, logit_bias={"0": -100}), 1),
        # EOS (0) is the argmax, but 2 tokens must come first; stop token 1 is banned as well.
        *requests(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]), 1, output=[7], eos={0}),
    ]
    batch = SamplingBatch.build(reqs, 4, torch.device("cpu"))
    assert sample(logits, batch, None).tokens.tolist() == [3, 1, 2]
    reqs[2].output_token_ids.append(7)  # min_tokens reached: EOS allowed again
    batch = SamplingBatch.build(reqs[2:], 4, torch.device("cpu"))
    assert sample(logits[2:], batch, None).tokens.tolist() == [0]


def test_logprobs_are_raw_log_softmax_with_rank_and_top_n():
    logits = torch.tensor([LOGITS, LOGITS])
    reqs = [
        *requests(SamplingParams(temperature=0, logprobs=3), 1),
        *requests(SamplingParams(temperature=0, logit_bias={6: 50}, logprobs=0), 1),
    ]
    out = sample(logits, SamplingBatch.build(reqs, 8, torch.device("cpu")), None)
    ref = torch.tensor(LOGITS).log_softmax(-1)
    assert out.tokens.tolist() == [0, 6]
    assert out.logprob.tolist() == pytest.approx([ref[0].item(), ref[6].item()])  # before the bias
    assert out.rank.tolist() == [1, 7]
    assert out.top_ids[0].tolist() == [0, 1, 2]
    assert out.top_logprobs[0].tolist() == pytest.approx(ref[:3].tolist())


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)
    logits = torch.tensor([LOGITS] * 6)

    def draw(reqs, rows):
        batch = SamplingBatch.build(reqs, 8, torch.device("cpu"))
        return sample(logits[: len(reqs)], batch, torch.Generator().manual_seed(rows)).tokens.tolist()

    seeded = [Request(f"s{i}", [0], params, output_token_ids=[5] * i) for i in range(3)]
    alone = [draw([r], 0)[0] for r in seeded]
    mixed = draw([*requests(other, 2), seeded[2], seeded[0], *requests(other, 1), seeded[1]], 99)
    assert [mixed[3], mixed[5], mixed[2]] == alone


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"logprobs": 0},
        {"logit_bias": {1: 2.0}},
        {"repetition_penalty": 1.1},
        {"presence_penalty": 0.5},
        {"min_tokens": 3},
        {"min_tokens": 3, "ignore_eos": True},
        {"temperature": 0.7},
        {"n": 1, "best_of": 2, "temperature": 0.7},
        {"seed": 5},
    ],
)
def test_argmax_only_agrees_with_the_built_batch(kwargs):
    """The runner skips building the batch when argmax_only says it would be plain greedy with no ban."""
    params = SamplingParams(**{"temperature": 0.0, **kwargs})
    for output in ((), (4, 5, 6)):
        reqs = requests(SamplingParams(temperature=0.0), 2) + requests(params, 1, output=output, eos={2})
        batch = SamplingBatch.build(reqs, 8, torch.device("cpu"))
        assert SamplingBatch.argmax_only(reqs) == (batch.plain_greedy and batch.banned is None)
