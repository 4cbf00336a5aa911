"""Sliding-window layers free the blocks behind their window (hybrid KV tables) without changing a token:
greedy output equals the run that keeps every block, on the PyTorch path and on the CPU kernels, with
prefix hits, parallel samples and speculation; a 16k-token Gemma 3 request holds a window's worth of
blocks on its local layers."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, MistralConfig

from kvloom import LLM, SamplingParams
from kvloom.core.kv_cache_manager import NULL_BLOCK, cdiv

from ..models.reference import random_prompts, save_random_model
from ..models.test_tiny_models import COMMON

# the tiny models' shapes, with layers and context of each test's own
SMALL = {k: v for k, v in COMMON.items() if k not in ("num_hidden_layers", "max_position_embeddings")}


def gemma3(layers: int, window: int, context: int) -> Gemma3TextConfig:
    """Gemma 3's pattern: every sixth layer global."""
    return Gemma3TextConfig(
        **SMALL,
        num_hidden_layers=layers,
        sliding_window=window,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=context,
    )


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, stories):
    folder = tmp_path_factory.mktemp("gemma3-hybrid")
    save_random_model(gemma3(6, 24, 17000), folder, stories)
    return folder


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory, stories):
    folder = tmp_path_factory.mktemp("mistral-window")
    save_random_model(MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=20), folder, stories)
    return folder


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 24, **kw) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw))
    return [c.token_ids for o in outs for c in o.outputs]


def logprobs(llm: LLM, prompts: list[list[int]], max_tokens: int = 24) -> list[list[float]]:
    """The chosen tokens' logprobs: the tiny random models' greedy tokens hardly depend on far positions,
    their logprobs do (reading one freed block moves them by 0.2)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    samples = [c for o in outs for c in o.outputs]
    return [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)] for c in samples]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_freeing_window_blocks_changes_no_token(family, dtype, gemma_folder, mistral_folder):
    folder = gemma_folder if family == "gemma3" else mistral_folder
    prompts = random_prompts(6, [5, 30, 47, 90, 200, 333], 512, seed=3)
    runs = {}
    for hybrid in (True, False):
        llm = LLM(
            str(folder),
            dtype=dtype,
            max_model_len=512,
            max_num_batched_tokens=64,  # chunks: windows cross chunk and block edges
            disable_hybrid_kv_cache_manager=not hybrid,
            show_progress=False,
        )
        layout = llm.engine.runner.layout
        assert layout.frees_blocks == hybrid
        # Gemma: one global layer and five local ones, a block table each
        assert layout.num_groups == (6 if family == "gemma3" and hybrid else 1)
        runs[hybrid] = greedy(llm, prompts), logprobs(llm, prompts)
        # prefix hits: the same prompts again, now cached (sliding tables hit the window before the end)
        assert greedy(llm, prompts) == runs[hybrid][0]
        assert llm.engine.kv_cache_manager.num_hit_tokens > 0
        kv = llm.engine.kv_cache_manager
        assert kv.num_free_blocks == llm.engine.runner.num_blocks - hybrid
    assert runs[True] == runs[False]


def test_parallel_samples_and_speculation_with_window_tables(gemma_folder):
    llm = LLM(str(gemma_folder), dtype="float32", max_model_len=512, show_progress=False)
    prompt = random_prompts(1, [120], 512, seed=4)
    base = greedy(llm, prompt, 40)
    # n=3 greedy samples fork the prompt's blocks (null entries included) and agree
    assert greedy(llm, prompt, 40, n=3) == base * 3
    # n-gram proposals roll back through the window tables (truncate)
    spec = LLM(
        str(gemma_folder),
        dtype="float32",
        max_model_len=512,
        speculative_method="ngram",
        num_speculative_tokens=4,
        prompt_lookup_min=1,
        show_progress=False,
    )
    looped = [prompt[0][:40] * 3]
    assert greedy(spec, looped, 40) == greedy(llm, looped, 40)


def test_16k_request_holds_a_window_of_local_blocks(gemma_folder):
    """A 16k-token Gemma 3 request: its global table grows with the sequence, each local table stays
    within the window plus one prefill chunk; the output equals the run that keeps every block."""
    chunk, bs, window = 2048, 16, 24
    prompt = random_prompts(1, [16384], 512, seed=5)
    outs = {}
    for hybrid in (True, False):
        llm = LLM(
            str(gemma_folder),
            dtype="bfloat16",
            max_model_len=16384 + 32,
            max_num_batched_tokens=chunk,
            disable_hybrid_kv_cache_manager=not hybrid,
            show_progress=False,
        )
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
        engine.add_request("long", prompt[0], params)
        most_local = most_held = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    c = out.outputs[0]
                    outs[hybrid] = [(t, lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
            tables = engine.kv_cache_manager.get_block_ids("long")
            if tables:
                local = [sum(b != NULL_BLOCK for b in t) for t in tables[1:]]
                most_local = max([most_local, *local])
                most_held = max(most_held, engine.kv_cache_manager.num_held_blocks("long"))
        if hybrid:
            assert engine.runner.layout.windows == (None,) + (window,) * 5
            assert most_local <= cdiv(window - 1 + chunk, bs) + 1
            # 16k tokens in the global table, a window (and a chunk) in each local one
            assert most_held <= cdiv(16384 + 16, bs) + 5 * (cdiv(window - 1 + chunk, bs) + 1)
        else:
            assert most_held == cdiv(16384 + 16, bs)
    assert outs[True] == outs[False]
