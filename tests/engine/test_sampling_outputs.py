"""The sampling and output surface on real weights (stories260K): logprobs vs transformers, seeds, stop
strings, n / best_of with shared prompt blocks."""

from __future__ import annotations

import random

import pytest
import torch

from kvloom import LLM, SamplingParams

from .test_engine import assert_all_blocks_free, mixed_prompts, record_schedules, tokens


@pytest.fixture(scope="module")
def hf_stories(stories):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()


def test_logprobs_equal_transformers_log_softmax(stories_llm, hf_stories):
    prompts = ["Once upon a time", "The little dog ran to the park and saw"]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, logprobs=5, prompt_logprobs=5)
    for out in stories_llm.generate(prompts, params):
        c = out.outputs[0]
        ids = out.prompt_token_ids + c.token_ids
        with torch.no_grad():
            ref = hf_stories(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [len, vocab]
        p = len(out.prompt_token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == p
        for pos in range(1, p):
            entry = out.prompt_logprobs[pos]
            assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)
            top = ref[pos - 1].topk(5)
            assert [t for t in entry if entry[t].rank <= 5][:5] == top.indices.tolist()
        assert len(c.logprobs) == len(c.token_ids)
        total = 0.0
        for k, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            row = ref[p - 1 + k]
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-3)
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(5)
            for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), 1):
                assert entry[t].logprob == pytest.approx(v, abs=1e-3) and entry[t].rank == rank
            total += entry[token].logprob
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_survive_chunking(stories):
    llm = LLM(str(stories), dtype="float32", max_num_batched_tokens=8, show_progress=False)
    prompt = "One day, a girl named Sue found a shiny stone in the garden. She picked it up and"
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    chunked = llm.generate([prompt], params)[0].prompt_logprobs
    whole = (
        LLM(str(stories), dtype="float32", show_progress=False).generate([prompt], params)[0].prompt_logprobs
    )
    assert len(chunked) == len(whole) > 8
    for a, b in zip(chunked[1:], whole[1:], strict=True):
        assert a.keys() == b.keys()
        assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)


def test_seeded_request_is_the_same_alone_in_a_batch_and_after_preemption(stories, stories_llm, monkeypatch):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40, ignore_eos=True)
    prompt = "Once upon a time, there was a little girl named"
    alone = tokens(stories_llm.generate([prompt], seeded))[0]
    others = [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True) for _ in range(15)]
    batch = mixed_prompts(15, seed=5)
    in_batch = tokens(
        stories_llm.generate([*batch[:7], prompt, *batch[7:]], [*others[:7], seeded, *others[7:]])
    )
    assert in_batch[7] == alone
    shuffled = list(range(16))
    random.Random(0).shuffle(shuffled)
    items = [(batch + [prompt])[i] for i in shuffled]
    params = [(others + [seeded])[i] for i in shuffled]
    assert tokens(stories_llm.generate(items, params))[shuffled.index(15)] == alone

    small = LLM(str(stories), dtype="float32", num_kv_blocks=10, max_model_len=160, show_progress=False)
    seen = record_schedules(small.engine, monkeypatch)
    got = tokens(small.generate([*batch[:7], prompt], [*others[:7], seeded]))
    assert any(e[0] == "preempted" for step in seen for e in step), "nothing was preempted"
    assert got[7] == alone
    assert alone != tokens(stories_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40)))[0]


def greedy_text(llm, prompt, n=60):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n))[0].outputs[0]


def test_stop_string_spanning_three_tokens_never_leaks(stories_llm):
    prompt = "Once upon a time"
    full = greedy_text(stories_llm, prompt)
    tok = stories_llm.get_tokenizer()
    # Find a stop string made of three whole output tokens, well inside the text.
    ids = full.token_ids
    start = len(tok.decode(ids[:10], skip_special_tokens=True))
    stop = full.text[start : len(tok.decode(ids[:13], skip_special_tokens=True))]
    assert len(tok(stop, add_special_tokens=False).input_ids) >= 3 and full.text.count(stop) == 1
    engine = stories_llm.engine
    engine.add_request("stop3", prompt, SamplingParams(temperature=0, max_tokens=60, stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0] for o in engine.step()]
    final = texts[-1]
    assert final.text == full.text[: full.text.index(stop)]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    # Every streamed state is a prefix of the final text: no part of the stop string was ever shown.
    assert all(final.text.startswith(t.text) for t in texts)

    kept = stories_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=60, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_string_that_is_a_prefix_of_another(stories_llm):
    prompt = "Once upon a time"
    full = greedy_text(stories_llm, prompt).text  # ", there was a little girl named Lily. She loved..."
    assert "Lily. She" in full
    out = stories_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=60, stop=["Lily. She", "Lily"])
    )[0].outputs[0]
    assert out.text == full[: full.index("Lily")] and out.stop_reason == "Lily"
    out = stories_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=60, stop=["zzz", "Lily. She"])
    )
    assert out[0].outputs[0].text == full[: full.index("Lily. She")]
    unmatched = stories_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, stop=["Lily!"]))
    assert unmatched[0].outputs[0].text == full and unmatched[0].outputs[0].finish_reason == "length"


def test_min_tokens_defers_stop_strings(stories_llm):
    prompt = "Once upon a time"
    full = greedy_text(stories_llm, prompt).text  # ", there was a little girl named Lily. She ... play ..."
    early = stories_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=60, stop=[" there"]))
    assert early[0].outputs[0].text == ","
    # " there" is the 2nd token: with min_tokens=5 it does not count, and the next match is later on.
    later = stories_llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=60, stop=[" there", " play"], min_tokens=5)
    )[0].outputs[0]
    assert later.text == full[: full.index(" play")] and later.stop_reason == " play"


def test_n4_shares_prompt_blocks_and_gives_different_samples(stories_llm):
    engine = stories_llm.engine
    prompt = [1] + list(range(300, 340))  # 41 tokens: blocks 0-1 full, block 2 holds the last 9
    engine.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True))
    engine.step()  # prompt computed once, first token sampled, three samples fork
    kv = engine.kv_cache_manager
    tables = [kv.get_block_ids(f"n4\x00{i}")[0] for i in range(4)]
    shared = tables[0][:2]
    assert all(t[:2] == shared for t in tables[1:])
    assert [kv.block_pool.ref_cnt[b] for b in shared] == [4, 4]
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 20 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) == 4
    assert_all_blocks_free(engine)


def test_n_greedy_samples_agree_and_best_of_returns_the_likeliest(stories_llm):
    prompt = "The little dog"
    greedy = greedy_text(stories_llm, prompt, 20).token_ids
    out = stories_llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=20))[0]
    assert [c.token_ids for c in out.outputs] == [greedy] * 3

    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=11, max_tokens=16, logprobs=0)
    out = stories_llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores == sorted(scores, reverse=True)
    for c in out.outputs:
        assert c.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True))
        )
    assert_all_blocks_free(stories_llm.engine)


def test_abort_of_an_n_request_before_it_forks(stories_llm):
    engine = stories_llm.engine
    engine.add_request("n3", "Once upon a time", SamplingParams(n=3, temperature=1.0, max_tokens=5))
    engine.abort("n3")
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_logit_bias_token_outside_the_vocabulary_is_rejected(stories_llm):
    with pytest.raises(ValueError, match="logit_bias"):
        stories_llm.engine.add_request("lb", "Lily", SamplingParams(logit_bias={100000: 5}))
