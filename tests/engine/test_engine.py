"""Engine behaviour on real weights (stories260K): batching, chunking, preemption, aborts, bad input."""

from __future__ import annotations

import ctypes
import json
import random
import shutil
import sys

import pytest

from kvloom import LLM, CompletionOutput, LLMEngine, RequestOutputKind, SamplingParams
from kvloom.core.scheduler import Scheduler
from kvloom.request import RequestStatus

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 120))] for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == engine.runner.num_blocks
    assert all(c == 0 for c in kv.block_pool.ref_cnt)
    assert not engine.scheduler.requests


def record_schedules(engine: LLMEngine, monkeypatch) -> list:
    seen = []
    original = Scheduler.schedule

    def schedule(self, proposals=None):
        out = original(self, proposals)
        seen.append(
            [(s.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]
            + [("preempted", p) for p in out.preempted_request_ids]
        )
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", schedule.__get__(engine.scheduler))
    return seen


def test_kv_pool_is_page_aligned(stories_llm):
    """The pool is carved page-aligned out of a calloc'd buffer (16 bytes into a page otherwise: cache loads
    straddled two lines, and block tails sat on the next block's page)."""
    assert stories_llm.engine.runner.kv_cache.data_ptr() % 4096 == 0


def resident_fraction(t) -> float:
    """Share of the pages under a page-aligned CPU tensor that are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    nbytes = t.numel() * t.element_size()
    pages = (nbytes + 4095) // 4096
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(t.data_ptr(), nbytes, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore residency is read on Linux")
def test_reserved_kv_pool_is_resident_and_changes_no_output(stories, stories_llm):
    """reserve_kv_cache writes the whole pool at start-up; the lazy pool gets pages as blocks are first
    written. Outputs are the same bits either way."""
    kw = dict(dtype="float32", max_model_len=512, show_progress=False)
    reserved, lazy = LLM(str(stories), reserve_kv_cache=True, **kw), LLM(str(stories), **kw)
    assert resident_fraction(reserved.engine.runner.kv_cache) == 1.0
    assert resident_fraction(lazy.engine.runner.kv_cache) < 0.1
    prompts = mixed_prompts(6, seed=7)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    a, b = reserved.generate(prompts, params), stories_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].logprobs for o in a] == [o.outputs[0].logprobs for o in b]


def test_batch_invariance_16_mixed_requests(stories_llm):
    prompts = mixed_prompts(16)
    together = tokens(stories_llm.generate(prompts, GREEDY))
    alone = [tokens(stories_llm.generate([p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 40 for t in together)
    assert_all_blocks_free(stories_llm.engine)


def test_chunking_and_preemption_give_the_same_outputs(stories, stories_llm, monkeypatch):
    prompts = mixed_prompts(12, seed=1)
    expected = tokens(stories_llm.generate(prompts, GREEDY))
    # A 32-token budget chunks every prompt over 32 tokens; 14 blocks of 16 tokens cannot hold 12 requests
    # of up to 160 tokens, so requests are preempted and recomputed.
    small = LLM(
        str(stories),
        dtype="float32",
        max_num_batched_tokens=32,
        num_kv_blocks=14,
        max_model_len=224,
        show_progress=False,
    )
    seen = record_schedules(small.engine, monkeypatch)
    got = tokens(small.generate(prompts, GREEDY))
    assert got == expected
    steps = [e for step in seen for e in step]
    assert any(e[0] != "preempted" and not e[3] and e[2] > 1 for e in steps), "no prefill was chunked"
    assert any(e[0] == "preempted" for e in steps), "nothing was preempted"
    assert small.engine.scheduler.num_preemptions > 0
    assert all(sum(e[2] for e in step if e[0] != "preempted") <= 32 for step in seen)
    assert_all_blocks_free(small.engine)


def test_abort_frees_blocks_and_others_finish(stories_llm):
    engine = stories_llm.engine
    prompts = mixed_prompts(6, seed=2)
    expected = tokens(stories_llm.generate(prompts, GREEDY))
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, GREEDY)
    engine.step()
    engine.step()
    engine.abort(["abort-1", "abort-4"])
    engine.abort("abort-5")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert sorted(done) == ["abort-0", "abort-2", "abort-3"]
    assert [done[f"abort-{i}"] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert_all_blocks_free(engine)


def test_streamed_deltas_add_up_to_the_final_text(stories_llm):
    engine = stories_llm.engine
    engine.add_request("stream", "Once upon a time", SamplingParams(temperature=0, max_tokens=30))
    pieces, printed, final = [], 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            assert text.startswith("".join(pieces))
            pieces.append(text[printed:])
            printed = len(text)
            final = out
    assert final.finished and "".join(pieces) == final.outputs[0].text
    assert final.metrics.first_token_time is not None and final.metrics.finished_time is not None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2, prompt_logprobs=1, stop=[" the"]),
        SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=24, logprobs=1),
        SamplingParams(n=2, best_of=3, temperature=0.8, seed=3, max_tokens=12),
    ],
    ids=["greedy-stop-logprobs", "n2-seeded", "best-of"],
)
def test_output_kinds_give_the_same_outputs(stories_llm, params):
    """FINAL_ONLY returns once what CUMULATIVE ends with; DELTA's pieces, joined, are the same."""
    engine = stories_llm.engine

    def run(kind: RequestOutputKind) -> list:
        engine.add_request("kind", "Once upon a time", params, output_kind=kind)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        return outs

    cumulative = run(RequestOutputKind.CUMULATIVE)
    final = run(RequestOutputKind.FINAL_ONLY)
    deltas = run(RequestOutputKind.DELTA)
    assert all(o.request_id == "kind" for o in cumulative)
    assert len(final) == 1 and final[0].finished and cumulative[-1].finished and deltas[-1].finished
    assert final[0].outputs == cumulative[-1].outputs  # text, token ids, logprobs, finish reasons
    assert final[0].metrics.first_token_time is not None and final[0].metrics.finished_time is not None
    assert final[0].prompt_logprobs == cumulative[-1].prompt_logprobs
    if params.best_of is None:
        assert len(cumulative) > 1 and len(deltas) == len(cumulative)
    joined = {}
    for i, out in enumerate(deltas):
        assert (out.prompt_logprobs is not None) == (i == 0 and params.prompt_logprobs is not None)
        for c in out.outputs:
            assert c.index not in joined or not joined[c.index].finished  # nothing after a sample's end
            j = joined.setdefault(
                c.index, CompletionOutput(c.index, "", [], logprobs=[] if c.logprobs else None)
            )
            j.text += c.text
            j.token_ids += c.token_ids
            if c.logprobs is not None:
                j.logprobs += c.logprobs
            j.cumulative_logprob, j.finish_reason, j.stop_reason = (
                c.cumulative_logprob,
                c.finish_reason,
                c.stop_reason,
            )
            j.num_tokens = c.num_tokens
            assert c.num_tokens == len(j.token_ids)
    assert [joined[i] for i in sorted(joined)] == final[0].outputs
    assert deltas[0].prompt_logprobs == final[0].prompt_logprobs


def test_sampling_is_reproducible_with_the_engine_seed_and_top_k_1_is_greedy(stories):
    prompts = ["Once upon a time", "The cat"]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, ignore_eos=True)
    runs = [
        tokens(LLM(str(stories), dtype="float32", seed=7, show_progress=False).generate(prompts, sampled))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    llm = LLM(str(stories), dtype="float32", seed=7, show_progress=False)
    greedy = tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    top1 = tokens(
        llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=30, ignore_eos=True))
    )
    assert top1 == greedy
    assert runs[0] != greedy


def test_eos_from_generation_config_finishes_requests(stories, stories_llm, tmp_path):
    # stories260K never emits </s> (2) greedily: like llama2.c it starts the next story with <s> (1).
    # generation_config.json may list several EOS ids (as chat models do); 1 among them ends the story.
    long = SamplingParams(temperature=0, max_tokens=400)
    out = stories_llm.generate(["Once upon a time"], long)[0]
    assert out.outputs[0].finish_reason == "length" and 1 in out.outputs[0].token_ids
    folder = tmp_path / "stories-eos"
    shutil.copytree(stories, folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [1, 2]}))
    llm = LLM(str(folder), dtype="float32", show_progress=False)
    assert llm.engine.config.eos_token_ids == {1, 2}
    got = llm.generate(["Once upon a time"], long)[0].outputs[0]
    cut = out.outputs[0].token_ids.index(1) + 1
    assert got.finish_reason == "stop" and got.token_ids == out.outputs[0].token_ids[:cut]
    ignored = llm.generate(
        ["Once upon a time"], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    )
    assert ignored[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_stop_token_ids_and_max_tokens_finish_requests(stories_llm):
    out = stories_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=5))[0]
    first = out.outputs[0].token_ids[0]
    out = stories_llm.generate(["Once upon a time"], SamplingParams(temperature=0, stop_token_ids=[first]))[0]
    assert out.outputs[0].token_ids == [first] and out.outputs[0].finish_reason == "stop"
    out = stories_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


def test_chat_template_without_double_bos(stories, tmp_path):
    folder = tmp_path / "stories-chat"
    shutil.copytree(stories, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(folder), dtype="float32", show_progress=False)
    ids = llm.apply_chat_template([{"role": "user", "content": "Tell me a story"}])
    assert ids[0] == 1 and ids.count(1) == 1
    out = llm.chat(
        [{"role": "user", "content": "Tell me a story"}], SamplingParams(temperature=0, max_tokens=8)
    )
    assert out[0].prompt_token_ids == ids and len(out[0].outputs[0].token_ids) == 8


# ---- bad input -------------------------------------------------------------------------------------------


def test_missing_model_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model", show_progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        LLM(str(tmp_path), show_progress=False)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="model"):
        LLM(str(tmp_path), show_progress=False)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "prompt: empty"),
        ([], "prompt"),
        ([5] * 512, "max_model_len"),
        ([1, 99999], "outside the vocabulary"),
        (3.5, "prompt"),
    ],
)
def test_bad_prompts_raise_and_the_engine_goes_on(stories_llm, prompt, match):
    engine = stories_llm.engine
    engine.add_request("survivor", "Once upon a time", SamplingParams(temperature=0, max_tokens=5))
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", prompt, GREEDY)
    with pytest.raises(ValueError, match=match):
        stories_llm.generate(["Lily", prompt], GREEDY)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["survivor"]
    assert len(finished[0].outputs[0].token_ids) == 5
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_sampling_params_raise_and_the_engine_goes_on(stories_llm, kwargs, field):
    engine = stories_llm.engine
    engine.add_request("survivor", "Lily", SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ValueError, match=field):
        engine.add_request("bad", "Lily", SamplingParams(**kwargs))
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(engine)


def test_duplicate_request_id_is_rejected(stories_llm):
    engine = stories_llm.engine
    engine.add_request("dup", "Lily", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "Lily", SamplingParams(max_tokens=2))
    engine.abort("dup")
    assert engine.scheduler.requests == {}
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"


def test_kv_pool_too_small_for_max_model_len(stories):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(str(stories), num_kv_blocks=4, max_model_len=512, show_progress=False)


def test_warm_up_leaves_no_trace(stories):
    from kvloom import SamplingParams
    from kvloom.engine import LLMEngine

    engine = LLMEngine.from_args(str(stories), dtype="float32", show_progress=False)
    free = engine.kv_cache_manager.block_pool.num_free_blocks
    assert engine.warm_up(num_requests=3, prompt_len=40, max_tokens=5) > 0
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_manager.block_pool.num_free_blocks == free
    assert engine.num_prompt_tokens == engine.num_generation_tokens == 0
    assert engine.kv_cache_manager.num_queried_tokens == 0
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_generation_tokens == 4
