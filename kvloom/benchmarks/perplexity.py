"""Perplexity of a text under a loaded model, from the engine's own prompt logprobs."""

from __future__ import annotations

import math
from pathlib import Path

from kvloom.sampling_params import SamplingParams

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "tests" / "data" / "perplexity.txt"
# Prompts whose greedy text a weight format's run is compared on (tests/models, bench/gguf_types.py)
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Hi",
    "Write a haiku about the sea.",
    "List three colors:",
    "Translate to French: The cat sits on the mat.",
]


def perplexity(llm, text: str, window: int | None = None) -> tuple[float, int]:  # noqa: ANN001 - kvloom.LLM
    """(exp of the mean negative logprob of every token after the first, tokens scored).

    Texts longer than ``window`` tokens (default: max_model_len) are scored in consecutive windows."""
    ids = llm.get_tokenizer().encode(text)
    window = window or llm.engine.config.model.max_model_len
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    outs = llm.generate(chunks, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    total, count = 0.0, 0
    for out in outs:
        for pos, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True):
            total -= pos[token].logprob
            count += 1
    return math.exp(total / count), count
