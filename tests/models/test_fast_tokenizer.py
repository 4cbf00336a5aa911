"""kvloom.tokenizer.FastTokenizer (the default model's tokenizer), converted from the GGUF file by kvloom
(kvloom.loader.gguf_tokenizer) and saved, against transformers' own conversion of the same file: the same
ids and text, and no transformers import on the way."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

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
    path = default_model_path()
    return fast, PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)


def test_conversion_equals_transformers(tmp_path, monkeypatch):
    """kvloom's conversion of the default model's tokenizer writes what transformers' conversion makes:
    the backend, the ids and template kvloom keeps, the files transformers reloads."""
    out = {}
    for how in ("kvloom", "transformers"):
        monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path / how))
        monkeypatch.setenv("KVLOOM_GGUF_TOKENIZER", how)
        out[how] = GGUFFile(default_model_path()).load_tokenizer().path
    for name in ("kvloom_backend.json", "kvloom_tokenizer.json", "tokenizer.json"):
        assert json.loads((out["kvloom"] / name).read_text()) == json.loads(
            (out["transformers"] / name).read_text()
        )
    assert (out["kvloom"] / "chat_template.jinja").read_text() == (
        out["transformers"] / "chat_template.jinja"
    ).read_text()
    ours, theirs = (json.loads((out[h] / "tokenizer_config.json").read_text()) for h in out)
    assert ours == {k: v for k, v in theirs.items() if k not in ("is_local", "local_files_only")}


def _gguf_tokenizer(path: Path, tokens: list[str], types: list[int], merges: list[str], **extra) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(extra.pop("pre", "gpt-2"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(extra.pop("bos", 0))
    w.add_eos_token_id(1)
    w.add_add_bos_token(extra.pop("add_bos", False))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_conversion_of_added_and_mislabelled_tokens(tmp_path):
    """A byte-level vocabulary with what the default model lacks: a user-defined token (added, not
    special), a control token spelled outside the byte alphabet (a llama.cpp mislabel: left as a plain
    entry) and a multi-byte token spelled in UTF-8 (respelled in the byte alphabet): encoded as
    transformers' conversion encodes; files kvloom does not take go to transformers."""
    from kvloom.loader.gguf import read_header
    from kvloom.loader.gguf_tokenizer import TOKENIZER_KEYS, convert

    alphabet = (
        [chr(c) for c in range(33, 127)]
        + [chr(c) for c in range(161, 173)]
        + [chr(c) for c in range(174, 256)]
    )
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    tokens = [
        "<s>",
        "</s>",
        "<think>",
        "ctrl\u2581x",
        "日本",
        *alphabet,
        "he",
        "hel",
        "hell",
        "hello",
        "\u0120w",
        "<|endoftext|>",
    ]
    types = [3, 3, 4, 3, 1] + [1] * (len(tokens) - 5)  # <|endoftext|> typed normal: special all the same
    merges = ["h e", "he l", "hel l", "hell o", "\u0120 w"]
    path = _gguf_tokenizer(tmp_path / "tiny.gguf", tokens, types, merges)
    ref = PreTrainedTokenizerFast.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    converted = convert(read_header(path, TOKENIZER_KEYS)[0])
    assert converted is not None  # kvloom converts this one
    backend, info, _ = converted
    ours = FastTokenizer(tmp_path, *FastTokenizer.write(tmp_path, backend, info | {"name_or_path": "tiny"}))
    assert json.loads(ours._json) == json.loads(ref.backend_tokenizer.to_str())
    for text in [
        "hello world",
        "<think>hello</think>",
        "<s>hi</s>",
        "café 日本 ctrl\u2581x",
        "hello <think> w",
    ]:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(
                text, add_special_tokens=special
            )
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token_id, ours.eos_token_id, len(ours)) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    # A file that adds BOS, splits with another regex or lacks <|endoftext|> is transformers' to convert.
    for name, kw in (
        ("bos.gguf", {"add_bos": True}),
        ("qwen.gguf", {"pre": "qwen2"}),
        ("eot.gguf", {"n": -1}),
    ):
        n = kw.pop("n", len(tokens))
        other = _gguf_tokenizer(tmp_path / name, tokens[:n], types[:n], merges, **kw)
        assert convert(read_header(other, TOKENIZER_KEYS)[0]) is None


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
