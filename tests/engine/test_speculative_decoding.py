"""Speculative decoding end to end: greedy outputs equal to the run without it (both proposers, k = 1..5,
mixed batches), the target's distribution kept under sampling (a draft that disagrees), no KV leaks after
rejections, preemption and aborts, and stop strings, logprobs, seeds and prefix caching alongside."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from kvloom import LLM, SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.engine import LLMEngine

from ..models.reference import KERNEL_SHAPES, save_random_model

# Prompts that repeat themselves (prompt lookup finds matches) and one that does not.
PROMPTS = [
    "Once upon a time there was a little girl named Lily. Once upon a time there was",
    "Tom had a red ball. Tom had a red ball. Tom had a",
    "The sun",
    "One day, a big dog and a small cat went to the park. The big dog and the small cat",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, stories):
    """A random model with stories260K's vocabulary: a draft that is almost always wrong."""
    folder = tmp_path_factory.mktemp("draft")
    save_random_model(_tiny_llama(512, bos_token_id=1, eos_token_id=2), folder, stories, seed=3)
    return folder


def _tiny_llama(vocab_size: int, **overrides) -> LlamaConfig:
    """A one-layer Llama small enough to be a draft (or a target) in these tests."""
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaConfig(vocab_size=vocab_size, **{**shape, **overrides})


@pytest.fixture(scope="module")
def reference(stories_llm):
    return [o.outputs[0].token_ids for o in stories_llm.generate(PROMPTS, GREEDY)]


def _run_staggered(engine: LLMEngine, prompts, params: list[SamplingParams]) -> list[list[int]]:
    """Requests arrive one per step, so prefills (chunked: small token budget) share steps with
    speculating decodes; outputs in prompt order."""
    pending = list(enumerate(zip(prompts, params, strict=True)))
    done: dict[int, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        if pending:
            i, (prompt, p) = pending.pop(0)
            engine.add_request(str(i), prompt, p)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return [done[i] for i in range(len(prompts))]


def _assert_no_leak(engine: LLMEngine) -> None:
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == engine.runner.num_blocks
    assert not kv._blocks
    p = engine.proposer
    # the runner drops finished requests' state at the next step (told by SchedulerOutput)
    assert set(engine.runner.requests) <= set(engine.scheduler._runner_dropped)
    if hasattr(p, "computed"):
        assert not p.computed and not p.runner.requests


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-random"])
def test_greedy_outputs_equal_without_speculation(stories, random_draft, reference, method, k):
    kw = dict(speculative_method="ngram" if method == "ngram" else "draft", num_speculative_tokens=k)
    if method == "draft-self":
        kw["speculative_quantization"] = "none"  # the target as its own draft: everything accepted
    elif method == "draft-random":
        kw["speculative_model"] = str(random_draft)
    llm = LLM(
        str(stories),
        dtype="float32",
        show_progress=False,
        max_num_batched_tokens=24,
        adaptive_speculation=False,
        **kw,
    )
    # a request that never speculates (one token) rides along
    got = _run_staggered(
        llm.engine, [*PROMPTS, "Lily"], [GREEDY] * len(PROMPTS) + [SamplingParams(max_tokens=1)]
    )
    assert got[:-1] == reference
    st = llm.engine.proposer.stats
    assert st.num_drafts > 0 and st.num_draft_tokens >= st.num_drafts
    if method == "draft-self":
        assert st.num_accepted_tokens == st.num_draft_tokens
    if method == "draft-random":
        assert st.acceptance_rate < 0.3
    assert sum(st.accepted_per_position) == st.num_accepted_tokens
    per_pos = st.accepted_per_position
    assert all(per_pos[j] >= per_pos[j + 1] for j in range(len(per_pos) - 1))
    _assert_no_leak(llm.engine)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampling_keeps_the_target_distribution(tmp_path, stories):
    """A 16-token model and a random draft that disagrees with it: the second and third tokens after
    speculation follow the target's exact marginals."""
    # peaked distributions (a wide init), so target and draft differ a lot
    cfg = _tiny_llama(16, num_hidden_layers=2, max_position_embeddings=64, initializer_range=0.3)
    save_random_model(cfg, tmp_path / "target", stories, seed=1)
    save_random_model(cfg, tmp_path / "draft", stories, seed=2)
    prompt = [3, 7, 5]
    V = 16

    def dist(llm, prefixes):
        """The next-token distribution after each prefix, from the model's full top-16 logprobs."""
        outs = llm.generate(prefixes, SamplingParams(max_tokens=1, logprobs=V, temperature=0))
        probs = torch.zeros(len(prefixes), V, dtype=torch.float64)
        for i, o in enumerate(outs):
            for t, lp in o.outputs[0].logprobs[0].items():
                probs[i, t] = math.exp(lp.logprob)
        return probs

    def marginals(llm):
        p1 = dist(llm, [prompt])[0]
        p2 = dist(llm, [prompt + [a] for a in range(V)])  # [t1, t2]
        p3 = dist(llm, [prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
        m2 = p1 @ p2
        m3 = torch.einsum("a,ab,abc->c", p1, p2, p3)
        return m2, m3

    opts = dict(dtype="float32", show_progress=False, enable_prefix_caching=False)
    target_m2, target_m3 = marginals(LLM(str(tmp_path / "target"), **opts))
    draft_m2, _ = marginals(LLM(str(tmp_path / "draft"), **opts))
    assert (target_m2 - draft_m2).abs().sum() > 0.5  # the draft disagrees

    llm = LLM(
        str(tmp_path / "target"),
        **opts,
        speculative_method="draft",
        speculative_model=str(tmp_path / "draft"),
        num_speculative_tokens=3,
        adaptive_speculation=False,
    )
    n = 3000
    params = [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=i) for i in range(n)]
    outs = [o.outputs[0].token_ids for o in llm.generate([prompt] * n, params)]
    st = llm.engine.proposer.stats
    assert 0.05 < st.acceptance_rate < 0.9  # both accepted and rejected proposals were verified
    for pos, expected in ((1, target_m2), (2, target_m3)):
        counts = torch.bincount(torch.tensor([o[pos] for o in outs]), minlength=V).double()
        exp = expected * n
        big = exp >= 5  # bins with few expected draws are merged into one
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([exp[big], exp[~big].sum()[None]])
        keep = exp > 0
        chi2 = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
        assert chi2 < _chi2_critical(int(keep.sum()) - 1), (pos, chi2, obs, exp)


def test_no_kv_leak_after_rejections_preemption_and_aborts(stories, random_draft, reference):
    llm = LLM(
        str(stories),
        dtype="float32",
        show_progress=False,
        num_kv_blocks=12,  # 192 tokens for four requests of ~60: preemptions
        max_model_len=128,
        speculative_method="draft",
        speculative_model=str(random_draft),
        num_speculative_tokens=4,
        adaptive_speculation=False,
        reserve_kv_cache=True,
    )
    engine = llm.engine
    assert engine.proposer.runner.config.cache.reserve_kv_cache  # the draft's pool is written up front too
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    engine.add_request("aborted", "Lily went", SamplingParams(max_tokens=40, ignore_eos=True))
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == 6:
            engine.abort("aborted")
    assert engine.scheduler.num_preemptions > 0
    assert [done[str(i)] for i in range(len(PROMPTS))] == reference
    _assert_no_leak(engine)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_stop_strings_logprobs_and_prefix_caching(stories, stories_llm, method):
    kw = dict(speculative_method=method, num_speculative_tokens=4, adaptive_speculation=False)
    if method == "draft":
        kw["speculative_quantization"] = "none"
    llm = LLM(str(stories), dtype="float32", show_progress=False, **kw)
    params = [
        SamplingParams(temperature=0, max_tokens=40, stop=["park"]),
        SamplingParams(temperature=0, max_tokens=40, logprobs=3),
        SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[13]),
    ]
    prompts = [PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    ref = stories_llm.generate(prompts, params)
    for run in range(2):  # the second run hits the prefix cache
        got = llm.generate(prompts, params)
        for g, r in zip(got, ref, strict=True):
            assert g.outputs[0].token_ids == r.outputs[0].token_ids
            assert g.outputs[0].text == r.outputs[0].text
            assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
            assert g.outputs[0].stop_reason == r.outputs[0].stop_reason
        if run == 1:
            assert all(g.num_cached_tokens > 0 for g in got)
        lp, rlp = got[1].outputs[0].logprobs, ref[1].outputs[0].logprobs
        assert len(lp) == len(rlp) == 40
        for a, b in zip(lp, rlp, strict=True):
            assert list(a) == list(b)
            assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)
        assert got[1].outputs[0].cumulative_logprob == pytest.approx(
            ref[1].outputs[0].cumulative_logprob, abs=1e-3
        )
    assert llm.engine.proposer.stats.num_accepted_tokens > 0


def test_seeded_sampling_is_reproducible(stories, random_draft):
    """With a fixed k, a seeded request's tokens depend only on its seed, not on the batch."""

    def run(prompts):
        llm = LLM(
            str(stories),
            dtype="float32",
            show_progress=False,
            speculative_method="draft",
            speculative_model=str(random_draft),
            num_speculative_tokens=3,
            adaptive_speculation=False,
        )
        params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=30, seed=11)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    alone = run(PROMPTS[:1])
    assert run(PROMPTS)[:1] == alone == run(PROMPTS[:1])


@pytest.mark.skipif(load_cpu_kernels() is None, reason="the int4 self-draft needs the CPU kernels")
def test_int4_self_draft_in_bf16(tmp_path, stories):
    """The default self-draft (the target with int4 weights) on a bf16 model with the kernels: greedy
    outputs equal the run without speculation (the kernels' rows do not depend on the batch)."""
    save_random_model(LlamaConfig(**KERNEL_SHAPES, initializer_range=0.15), tmp_path, stories)
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [100, 200, 300, 400]]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = LLM(str(tmp_path), dtype="bfloat16", show_progress=False)
    spec = LLM(
        str(tmp_path),
        dtype="bfloat16",
        show_progress=False,
        speculative_method="draft",
        num_speculative_tokens=3,
        adaptive_speculation=False,
    )
    assert spec.engine.proposer.config.model.quantization == "int4"
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    # random weights give flat distributions that int4 rounding often reorders; real models agree more
    assert spec.engine.proposer.stats.num_accepted_tokens > 0


def test_bad_speculative_settings(stories, random_draft, tmp_path):
    for kw, field in [
        (dict(speculative_method="medusa"), "speculative_method"),
        (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(speculative_method="ngram", speculative_model=str(random_draft)), "speculative_model"),
        (dict(speculative_method="ngram", prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup"),
        (dict(speculative_method="draft", speculative_quantization="int3"), "speculative_quantization"),
    ]:
        with pytest.raises(ValueError, match=field):
            LLM(str(stories), dtype="float32", show_progress=False, **kw)
    other = tmp_path / "other-vocab"
    save_random_model(_tiny_llama(256), other, stories)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(
            str(stories),
            dtype="float32",
            show_progress=False,
            speculative_method="draft",
            speculative_model=str(other),
        )


def test_prometheus_counters(stories):
    from kvloom.server.metrics import ServerMetrics

    llm = LLM(
        str(stories),
        dtype="float32",
        show_progress=False,
        speculative_method="ngram",
        num_speculative_tokens=3,
        adaptive_speculation=False,
    )
    metrics = ServerMetrics("stories")
    metrics.observe(llm.engine, [])
    text = metrics.render().decode()
    assert 'kvloom:spec_decode_num_draft_tokens_total{model_name="stories"} 0.0' in text
    llm.generate(PROMPTS[:2], GREEDY)
    metrics.observe(llm.engine, [])
    text = metrics.render().decode()
    st = llm.engine.proposer.stats
    assert st.num_draft_tokens > 0
    assert (
        f'kvloom:spec_decode_num_draft_tokens_total{{model_name="stories"}} {float(st.num_draft_tokens)}'
        in text
    )
    name = 'model_name="stories"'
    assert f"kvloom:spec_decode_num_accepted_tokens_total{{{name}}} {float(st.num_accepted_tokens)}" in text
    assert f"kvloom:spec_decode_num_drafts_total{{{name}}} {float(st.num_drafts)}" in text
    for kind, per_pos in (("draft", st.proposed_per_position), ("accepted", st.accepted_per_position)):
        for j, n in enumerate(per_pos):
            line = f'kvloom:spec_decode_num_{kind}_tokens_per_pos_total{{{name},position="{j}"}} {float(n)}'
            assert line in text
    assert "speculation:" in llm.engine.stats_line()


def test_samples_of_one_request_and_warm_up(stories, random_draft):
    """n > 1 samples fork after the prompt and speculate on their own; warm-up leaves no counters."""
    engine = LLMEngine.from_args(
        str(stories),
        dtype="float32",
        show_progress=False,
        speculative_method="draft",
        speculative_model=str(random_draft),
        num_speculative_tokens=2,
        adaptive_speculation=False,
    )
    engine.warm_up(num_requests=2, prompt_len=20, max_tokens=6)
    assert engine.proposer.stats.num_drafts == 0 and not engine.proposer.computed
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    engine.add_request("r", PROMPTS[0], params)
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
    (final,) = out
    assert final.finished and len(final.outputs) == 3
    assert all(len(c.token_ids) == 12 for c in final.outputs)
    assert engine.proposer.stats.num_drafts > 0
    _assert_no_leak(engine)
