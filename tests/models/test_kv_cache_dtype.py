"""One-byte KV caches (``--kv-cache-dtype int8 | fp8 | fp8_e5m2``): the pool holds more tokens, the kernels
and the PyTorch reference read the same cache alike, and a real model stays close to its bf16 cache."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig

from kvloom import LLM, SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.benchmarks.perplexity import DEFAULT_TEXT, perplexity
from kvloom.layers.kv_cache import KVFormat

from .reference import random_prompts, save_random_model
from .test_quantized_models import GREEDY_PROMPTS
from .test_tiny_models import COMMON

needs_kernels = pytest.mark.skipif(load_cpu_kernels() is None, reason="needs the CPU kernels (AVX-512 BF16)")
FORMATS = ["int8", "fp8", "fp8_e5m2"]


def _prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    return torch.tensor(
        [
            lp[t].logprob
            for o in outs
            for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)
        ]
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory, stories):
    folder = tmp_path_factory.mktemp("llama")
    save_random_model(LlamaConfig(**{**COMMON, "head_dim": 32, "initializer_range": 0.1}), folder, stories)
    return folder


def test_the_pool_holds_more_tokens_and_the_log_says_how_many(llama, caplog):
    """Same memory, D + 2 bytes per head and token instead of 2 D (head_dim 32: 1.88x the blocks)."""
    blocks = {}
    for dtype in ("auto", "int8"):
        with caplog.at_level(logging.INFO, logger="kvloom"):
            llm = LLM(
                str(llama),
                dtype="bfloat16",
                kv_cache_dtype=dtype,
                kv_cache_memory=1 << 22,
                show_progress=False,
            )
        runner = llm.engine.runner
        blocks[dtype] = runner.num_blocks
        assert runner.kv_cache.dtype == (torch.uint8 if dtype == "int8" else torch.bfloat16)
    assert blocks["int8"] == (1 << 22) // (2 * 2 * 2 * 34 * 16)  # layers, K/V, kv heads, D + 2, block size
    assert blocks["auto"] == (1 << 22) // (2 * 2 * 2 * 64 * 16)
    assert "int8 with a bf16 scale per token and head" in caplog.text and "1.88x bfloat16" in caplog.text


def test_bad_kv_cache_dtype_is_refused_naming_the_field(stories):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(str(stories), kv_cache_dtype="int4", show_progress=False)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVFormat.of("fp16")


@needs_kernels
@pytest.mark.parametrize("name", FORMATS)
def test_kernels_and_reference_read_the_cache_alike(llama, name):
    """The same bf16 model with a one-byte cache on the CPU kernels and on PyTorch ops (which quantize bit
    for bit alike: tests/unit/test_cpu_kernels.py): prompt logprobs (chunked prefill, so later chunks read
    the cache) as close as the two backends are with a bf16 cache, and both near the bf16 cache."""
    prompts = random_prompts(4, [40, 75, 23, 90], COMMON["vocab_size"], seed=5)
    runs = {}
    for backend in ("auto", "torch"):
        for dtype in ("auto", name):
            llm = LLM(
                str(llama),
                dtype="bfloat16",
                backend=backend,
                kv_cache_dtype=dtype,
                max_num_batched_tokens=32,
                enable_prefix_caching=False,
                show_progress=False,
            )
            runs[backend, dtype] = _prompt_logprobs(llm, prompts)
    # NOTE: means: a random model's logprobs fork somewhere between any two bf16 runs (max differences
    # 0.02-0.03 with either cache); the cache's own error is 0.007 (int8) to 0.04 (E5M2) here
    backends_bf16 = (runs["auto", "auto"] - runs["torch", "auto"]).abs().mean()
    backends_q = (runs["auto", name] - runs["torch", name]).abs().mean()
    assert backends_q < 2 * backends_bf16, (backends_q, backends_bf16)
    err = {b: (runs[b, name] - runs[b, "auto"]).abs().mean() for b in ("auto", "torch")}
    assert err["torch"] > 0 and abs(err["auto"] / err["torch"] - 1) < 0.25, err


@pytest.mark.parametrize("name", FORMATS)
def test_fp32_reference_reads_dequantized_values(stories, name):
    """The PyTorch path in fp32: a one-byte cache changes the logprobs only by its rounding (each K/V
    within its format's step), and prefix-cached blocks read back exactly what a fresh prefill writes."""
    llm = LLM(str(stories), dtype="float32", kv_cache_dtype=name, show_progress=False)
    text = DEFAULT_TEXT.read_text().split("\n\n")
    prompts = [llm.get_tokenizer().encode(t)[:60] for t in text[:3]]
    plain = _prompt_logprobs(LLM(str(stories), dtype="float32", show_progress=False), prompts)
    first = _prompt_logprobs(llm, prompts)
    again = _prompt_logprobs(llm, prompts)  # the prefix cache's blocks, the same bytes
    assert torch.equal(first, again)
    # stories260K's heads are 8 wide: one scale per 8 values; int8 moves its logprobs 0.09 on average here
    assert 0 < (first - plain).abs().mean() < {"int8": 0.15, "fp8": 0.3, "fp8_e5m2": 0.6}[name]


def test_perplexity_close_on_a_real_model(stories):
    """stories260K (the PyTorch path): an int8 cache within 1% of bf16's perplexity, FP8 E4M3 within 2%
    (measured: -0.3% and +1.4%; its heads are 8 wide, so each scale covers 8 values: SmolLM2's 64-wide
    heads are within 1% for both, test_smollm2_on_the_kernels_close_to_the_bf16_cache)."""
    text = DEFAULT_TEXT.read_text()
    ppl = {}
    for dtype in ("auto", "int8", "fp8"):
        llm = LLM(str(stories), dtype="bfloat16", kv_cache_dtype=dtype, show_progress=False)
        ppl[dtype] = perplexity(llm, text, 256)[0]
    assert abs(ppl["int8"] / ppl["auto"] - 1) < 0.01, ppl
    assert abs(ppl["fp8"] / ppl["auto"] - 1) < 0.02, ppl


@pytest.mark.slow
@needs_kernels
def test_smollm2_on_the_kernels_close_to_the_bf16_cache():
    """SmolLM2 (head_dim 64, on the kernels' attention): perplexity within 1% for int8 and fp8, and greedy
    text that starts the same on most prompts."""
    text = DEFAULT_TEXT.read_text()
    greedy = SamplingParams(temperature=0, max_tokens=16)
    runs = {}
    for dtype in ("auto", "int8", "fp8"):
        llm = LLM(None, dtype="bfloat16", quantization="none", kv_cache_dtype=dtype, show_progress=False)
        assert type(llm.engine.runner.backend.attention).__name__ == "KernelAttention"
        outs = llm.generate(GREEDY_PROMPTS, greedy, use_tqdm=False)
        runs[dtype] = (perplexity(llm, text)[0], [o.outputs[0].token_ids for o in outs])
        del llm
    ppl_bf16, text_bf16 = runs["auto"]
    for dtype in ("int8", "fp8"):
        ppl, out = runs[dtype]
        assert abs(ppl / ppl_bf16 - 1) < 0.01, (dtype, ppl, ppl_bf16)
        same = sum(a[:8] == b[:8] for a, b in zip(out, text_bf16, strict=True))
        assert same > len(GREEDY_PROMPTS) // 2, (dtype, same)
