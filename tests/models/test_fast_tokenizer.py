"""kvloom.tokenizer.FastTokenizer (the default model's tokenizer on later starts) against the transformers
tokenizer it was saved from: the same ids and text, and no transformers import on the way."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvloom.loader.checkpoint import default_model_path
from kvloom.loader.gguf import GGUFFile
from kvloom.tokenizer import FastTokenizer

TEXTS = [
    "",
    "Hello world!",
    "  leading spaces, trailing spaces   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café, 日本語のテキスト, emoji 🙂👍🏽, tabs\tand\r\nnewlines",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|><|endoftext|> stuck<|im_end|>together",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLOOM_CACHE_DIR", str(cache))
    try:
        GGUFFile(default_model_path()).load_tokenizer()  # first start: converted and saved
        fast = GGUFFile(default_model_path()).load_tokenizer()  # a later start: from the saved files
    finally:
        mp.undo()
    assert isinstance(fast, FastTokenizer) and fast._hf is None
    return fast, fast.hf


def test_encode_matches_transformers(tokenizers):
    fast, hf = tokenizers
    text = (Path(__file__).parents[1] / "data" / "perplexity.txt").read_text()
    for t in [*TEXTS, text]:
        for special in (True, False):
            assert fast.encode(t, add_special_tokens=special) == hf.encode(t, add_special_tokens=special)
            assert (
                fast(t, add_special_tokens=special).input_ids == hf(t, add_special_tokens=special).input_ids
            )


def test_decode_matches_transformers(tokenizers):
    fast, hf = tokenizers
    for t in TEXTS:
        ids = hf.encode(t)
        for skip in (False, True):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        for i in ids:  # one token at a time, as the detokenizer and logprobs do
            assert fast.decode([i]) == hf.decode([i]) and fast.decode(i) == hf.decode(i)
    assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_special_ids_template_and_the_rest_from_transformers(tokenizers):
    fast, hf = tokenizers
    assert (fast.eos_token_id, fast.bos_token_id, fast.pad_token_id) == (
        hf.eos_token_id,
        hf.bos_token_id,
        hf.pad_token_id,
    )
    assert fast.all_special_ids == list(hf.all_special_ids) and len(fast) == len(hf)
    assert fast.chat_template == hf.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(messages, tokenize=False) == hf.apply_chat_template(
        messages, tokenize=False
    )
    assert fast.get_vocab() == hf.get_vocab()  # delegated
    # Other inputs and arguments go to transformers, with its results.
    assert fast.decode(torch.tensor(hf.encode("Hi there"))) == hf.decode(torch.tensor(hf.encode("Hi there")))
    assert fast(["a", "b c"]).input_ids == hf(["a", "b c"]).input_ids
    assert fast.encode("a b c d", truncation=True, max_length=2) == hf.encode(
        "a b c d", truncation=True, max_length=2
    )
    twin = copy.deepcopy(fast)
    assert twin is not fast and twin.encode(TEXTS[3]) == fast.encode(TEXTS[3])


def test_a_later_start_does_not_import_transformers(tmp_path):
    code = f"""
import os, sys
os.environ["KVLOOM_CACHE_DIR"] = {str(tmp_path)!r}
from kvloom.loader.checkpoint import Checkpoint, default_model_path
ck = Checkpoint(default_model_path(), "gguf")
ck.load_tokenizer()
if sys.argv[1] == "later":
    ck = Checkpoint(default_model_path(), "gguf")
    tok, cfg = ck.load_tokenizer(), ck.hf_config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads == 3
    assert tok.encode("Hello") and "transformers" not in sys.modules
    from kvloom import LLM, SamplingParams  # and nothing on the way to generated text imports it either
    out = LLM(show_progress=False).generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].text and "transformers" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code, "first"], check=True)
    subprocess.run([sys.executable, "-c", code, "later"], check=True)
