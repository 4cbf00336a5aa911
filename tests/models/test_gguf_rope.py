"""GGUF files written as llama.cpp writes them, against transformers on the weights they came from: Llama
3.x rope_freqs (Llama 3.1+ rope scaling as llama.cpp stores it) and yarn; Mixtral (llama files with
experts) and Qwen3-MoE with each layer's experts in one tensor."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from kvloom import LLM, SamplingParams

from .gguf_writer import random_llama, write_gguf
from .reference import hf_greedy, random_prompts

SHAPES = dict(
    vocab_size=49152,  # the default model's tokenizer, which the file carries
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=True,  # Llama 3.2 1B / 3B
    initializer_range=0.3,  # attention sharp enough that positions (and so the rope) decide tokens
)
ROPES = {
    # positions past original_max_position_embeddings (32) use the scaled low frequencies
    "llama3-rope-freqs": (
        dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        None,
    ),
    "yarn": (
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
        {"scaling.type": "yarn", "scaling.factor": 4.0, "scaling.original_context_length": 64},
    ),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_gguf_rope_scaling_greedy_equals_transformers(tmp_path, rope):
    params, metadata = ROPES[rope]
    model = random_llama(LlamaConfig(**SHAPES, rope_parameters=params))
    path = write_gguf(model, tmp_path / f"{rope}.gguf", rope=metadata)
    prompts = random_prompts(4, [5, 40, 90, 150], 49152, seed=3)
    expected = hf_greedy(model, prompts, 40)
    llm = LLM(str(path), dtype="float32", show_progress=False)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(len(e) for e in expected) > 4 * 20


@pytest.mark.parametrize("family", ["mixtral", "qwen3moe"])
def test_moe_gguf_greedy_equals_transformers(tmp_path, family):
    from transformers import MixtralConfig, Qwen3MoeConfig

    shapes = {**SHAPES, "initializer_range": 0.1}
    if family == "mixtral":
        config = MixtralConfig(**shapes, num_local_experts=4, num_experts_per_tok=2)
        arch = "llama"
    else:
        config = Qwen3MoeConfig(
            **shapes, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True
        )
        arch = "qwen3moe"
    model = random_llama(config)
    path = write_gguf(model, tmp_path / f"{family}.gguf", arch)
    prompts = random_prompts(3, [5, 40, 90], 49152, seed=4)
    expected = hf_greedy(model, prompts, 32)
    llm = LLM(str(path), dtype="float32", show_progress=False)
    assert llm.engine.config.model_type == config.model_type
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    assert [o.outputs[0].token_ids for o in outs] == expected
