"""W8A8 (``--quantization w8a8``): SmoothQuant keeps the model's function, and the engine on int8 weights
and activations stays close to bf16 on a real model."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig

from kvloom import LLM, SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.benchmarks.perplexity import DEFAULT_TEXT, perplexity
from kvloom.quantization.smoothquant import smooth

from .reference import random_prompts, save_random_model
from .test_tiny_models import COMMON

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    # (1 + weight) norms, and the norm before the MLP is pre_feedforward_layernorm
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 2},
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


def _prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return torch.tensor(
        [
            lp[t].logprob
            for o in outs
            for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)
        ]
    )


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_smoothing_keeps_the_function(family, tmp_path, stories):
    """Every smoothed pair (norm -> q/k/v, norm -> gate/up, up -> down) moves scales without changing the
    model's output (fp32: prompt logprobs within 1e-4), and it moves them (the weights change)."""
    save_random_model(CONFIGS[family](), tmp_path, stories)
    llm = LLM(str(tmp_path), dtype="float32", enable_prefix_caching=False, show_progress=False)
    prompts = random_prompts(3, [9, 30, 17], 512, seed=3)
    before = _prompt_logprobs(llm, prompts)
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    weights = [layer.input_layernorm.weight, layer.mlp_norm.weight, layer.mlp.down_proj.weight]
    old = [w.detach().clone() for w in weights]
    smooth(model, llm.get_tokenizer(), 256)
    assert all(not torch.equal(w, o) for w, o in zip(weights, old, strict=True))
    after = _prompt_logprobs(llm, prompts)
    assert (after - before).abs().max() < 1e-4


@pytest.mark.skipif(load_cpu_kernels() is None, reason="W8A8 runs on the CPU kernels (AVX-512 VNNI)")
def test_w8a8_close_to_bf16_on_a_real_model(stories):
    """stories260K: perplexity within 2% of bf16 (with SmoothQuant), and greedy text that starts the same."""
    text = DEFAULT_TEXT.read_text()
    runs = {}
    for quant in ("none", "w8a8"):
        llm = LLM(str(stories), dtype="bfloat16", quantization=quant, show_progress=False)
        kinds = {m.method.weight_format for m in llm.engine.runner.model.modules() if hasattr(m, "method")}
        assert ("q9" in kinds) == (quant == "w8a8")
        outs = llm.generate(
            ["Once upon a time", "The little dog", "Lily wanted to"],
            SamplingParams(temperature=0, max_tokens=8),
            use_tqdm=False,
        )
        runs[quant] = (perplexity(llm, text, 256)[0], [o.outputs[0].token_ids for o in outs])
    (ppl_bf16, greedy_bf16), (ppl_w8, greedy_w8) = runs["none"], runs["w8a8"]
    assert abs(ppl_w8 / ppl_bf16 - 1) < 0.02, (ppl_bf16, ppl_w8)
    assert sum(a[:4] == b[:4] for a, b in zip(greedy_bf16, greedy_w8, strict=True)) >= 2
