"""Random-weight tiny models of every supported architecture: greedy output equals transformers."""

from __future__ import annotations

import pytest
from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from kvloom import LLM, SamplingParams

from .reference import hf_greedy, random_prompts, save_random_model

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.3,  # attention sharp enough that positions, rope and windows decide tokens
)


def phi3_longrope(max_positions: int, original: int, **kw) -> Phi3Config:
    """Longrope over an original context of ``original`` positions, stretched to ``max_positions``."""
    return Phi3Config(
        **{**COMMON, "max_position_embeddings": max_positions},
        pad_token_id=0,
        original_max_position_embeddings=original,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + i / 8 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)],
        },
        **kw,
    )


CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama-mha-bias": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 4}, attention_bias=True),
    "llama3-rope-scaling": lambda: LlamaConfig(
        **COMMON,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral-sliding-window": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2-tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen2-untied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON),
    # local (window 8) and global layers, their two rotary bases, the global one scaled
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
    # Phi-4-mini's partial rotary (3/4 of each head), tied embeddings
    "phi3-partial-rotary": lambda: Phi3Config(
        **COMMON,
        pad_token_id=0,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    ),
    # longrope within the original context: the short factors
    "phi3-longrope-window": lambda: phi3_longrope(256, 256, sliding_window=24),
    # mixtures of experts: 8 experts, top 2 (renormalized or not), shared expert, dense layers among them
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, sliding_window=16),
    "qwen2-moe-shared-expert": lambda: Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 3},
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        mlp_only_layers=[1],
    ),
    "qwen3-moe": lambda: Qwen3MoeConfig(
        **COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True
    ),
    "olmoe": lambda: OlmoeConfig(
        **COMMON, num_experts=8, num_experts_per_tok=2, pad_token_id=0, clip_qkv=4.0
    ),
    "gemma3-softcap": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 2}, sliding_window=8, final_logit_softcapping=3.0
    ),
}

PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 50, 90]  # longer than the sliding window of 8


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory, stories):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = save_random_model(CONFIGS[request.param](), folder, stories)
    prompts = random_prompts(8, PROMPT_LENGTHS, 512, seed=1)
    return request.param, folder, hf_model, prompts, hf_greedy(hf_model, prompts, 64)


@pytest.mark.parametrize("budget", [None, 16], ids=["whole-prompts", "chunked-16"])
def test_greedy_equals_transformers(tiny, budget):
    name, folder, _, prompts, expected = tiny
    llm = LLM(
        str(folder), dtype="float32", max_num_batched_tokens=budget, max_num_seqs=16, show_progress=False
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
    got = [o.outputs[0].token_ids for o in outs]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{name}: prompt {i} (len {len(prompts[i])}) differs"
    assert sum(len(e) for e in expected) > 8 * 32  # the comparison covers real continuations
    runner = llm.engine.runner
    assert llm.engine.kv_cache_manager.num_free_blocks == runner.num_blocks - runner.layout.frees_blocks


def test_phi3_longrope_takes_its_long_factors_past_the_original_context(tmp_path, stories):
    """A context past the original one (as llama.cpp decides): the long factors, which transformers takes
    for a sequence longer than the original context from its first position."""
    hf_model = save_random_model(phi3_longrope(512, 128), tmp_path, stories)
    prompts = random_prompts(3, [140, 200, 260], 512, seed=2)
    expected = hf_greedy(hf_model, prompts, 32)
    llm = LLM(str(tmp_path), dtype="float32", show_progress=False)
    assert llm.engine.config.model.max_model_len == 512
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    assert [o.outputs[0].token_ids for o in outs] == expected
