"""Automatic prefix caching on real weights (stories260K): equal outputs on and off, hits, safe eviction."""

from __future__ import annotations

import random

import pytest

from kvloom import LLM, SamplingParams

from .test_engine import assert_all_blocks_free, record_schedules, tokens

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True)


def shared_prefix_prompts(n: int, prefix_len: int = 70, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(3, 512) for _ in range(prefix_len - 1)]
    return [prefix + [rng.randrange(3, 512) for _ in range(rng.randint(1, 30))] for _ in range(n)]


@pytest.fixture(scope="module")
def llm_off(stories):
    return LLM(str(stories), dtype="float32", enable_prefix_caching=False, show_progress=False)


@pytest.fixture(scope="module")
def llm_on(stories):
    return LLM(str(stories), dtype="float32", show_progress=False)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_identical_with_cache_on_and_off(llm_on, llm_off, params):
    prompts = shared_prefix_prompts(12)
    off = llm_off.generate(prompts, params)
    # Twice with the cache: the second run hits on the first run's (finished) blocks too.
    on_first = llm_on.generate(prompts, params)
    on_again = llm_on.generate(prompts, params)
    assert tokens(on_first) == tokens(off) == tokens(on_again)
    assert all(o.num_cached_tokens == 0 for o in off)
    assert all(o.num_cached_tokens >= 64 for o in on_again)  # the 70-token prefix: 4 full blocks of 16
    assert_all_blocks_free(llm_on.engine)


def test_hits_on_blocks_of_requests_that_finished_and_on_generated_tokens(llm_on):
    engine = llm_on.engine
    first = llm_on.generate(
        ["Once upon a time, there was a little dog"], SamplingParams(temperature=0, max_tokens=40)
    )[0]
    # A second turn resends the history: prompt + reply + a new question.
    history = first.prompt_token_ids + first.outputs[0].token_ids
    tok = llm_on.get_tokenizer()
    second = llm_on.generate([history + tok(" Then", add_special_tokens=False).input_ids], GREEDY)[0]
    assert second.num_cached_tokens == (len(history) - 1) // 16 * 16 > len(first.prompt_token_ids)
    kv = engine.kv_cache_manager
    assert kv.num_hit_tokens > 0 and kv.num_queried_tokens > kv.num_hit_tokens
    assert "prefix cache hit rate" in engine.stats_line()


def test_different_cache_salts_never_share_blocks(llm_on):
    engine = llm_on.engine
    prompt = shared_prefix_prompts(1, seed=9)[0]
    outs = {}
    for rid, salt in [("s1", "alice"), ("s2", "bob"), ("s3", "alice"), ("s4", None), ("s5", None)]:
        engine.add_request(rid, prompt, GREEDY, cache_salt=salt)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
    assert outs["s1"].num_cached_tokens == 0
    assert outs["s2"].num_cached_tokens == 0  # same tokens, other salt
    assert outs["s3"].num_cached_tokens > 0  # same salt as s1
    assert outs["s4"].num_cached_tokens == 0 and outs["s5"].num_cached_tokens > 0
    assert len({tuple(o.outputs[0].token_ids) for o in outs.values()}) == 1


def test_eviction_under_memory_pressure_never_corrupts_running_requests(stories, llm_off, monkeypatch):
    # 16 blocks of 16 tokens for up to 6 requests of ~100-160 tokens: cached blocks are evicted all the
    # time and requests are preempted, while others hit on the shared prefix.
    prompts = shared_prefix_prompts(10, prefix_len=50, seed=2) + shared_prefix_prompts(
        6, prefix_len=60, seed=3
    )
    random.Random(1).shuffle(prompts)
    expected = tokens(llm_off.generate(prompts, GREEDY))
    small = LLM(
        str(stories),
        dtype="float32",
        num_kv_blocks=16,
        max_model_len=256,
        max_num_batched_tokens=64,
        show_progress=False,
    )
    seen = record_schedules(small.engine, monkeypatch)
    evictions = 0
    pool = small.engine.kv_cache_manager.block_pool
    original = pool._evict

    def counting_evict(block_id):
        nonlocal evictions
        evictions += pool.block_hash[block_id] is not None
        original(block_id)

    monkeypatch.setattr(pool, "_evict", counting_evict)
    outs = small.generate(prompts, GREEDY)
    assert tokens(outs) == expected
    assert evictions > 0, "nothing was evicted"
    assert any(e[0] == "preempted" for step in seen for e in step), "nothing was preempted"
    assert any(o.num_cached_tokens > 0 for o in outs), "nothing was hit"
    assert_all_blocks_free(small.engine)


def test_no_leaked_ref_counts_after_aborts_and_preemptions(stories):
    llm = LLM(str(stories), dtype="float32", num_kv_blocks=14, max_model_len=224, show_progress=False)
    engine = llm.engine
    prompts = shared_prefix_prompts(12, prefix_len=40, seed=4)
    for i, p in enumerate(prompts):
        engine.add_request(
            f"r{i}", p, SamplingParams(n=2 if i % 3 == 0 else 1, temperature=0.8, max_tokens=40)
        )
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps in (3, 7, 11):
            engine.abort([f"r{steps % 12}", f"r{(steps + 5) % 12}"])
    assert engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(engine)
    assert engine.kv_cache_manager.block_pool.cached  # freed blocks stay cached (hit-able)
