"""The per-file GGUF cache (tensor table, config, converted tokenizer) gives what parsing the file gives."""

from __future__ import annotations

import os

import pytest

from kvloom.loader.checkpoint import default_model_path
from kvloom.loader.gguf import GGUFFile


def test_gguf_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    parsed = GGUFFile(path)
    assert (parsed.cache / "meta.json").is_file()
    tok_parsed = parsed.load_tokenizer()  # converted from the GGUF metadata, then saved
    assert (parsed.cache / "tokenizer" / "tokenizer_config.json").is_file()

    cached = GGUFFile(path)
    assert cached.tensors == parsed.tensors and cached._config == parsed._config
    assert cached.hf_config().to_dict() == parsed.hf_config().to_dict()
    tok_cached = cached.load_tokenizer()
    text = "Hello world!\n  <|im_start|>user\nWhat is 2+2?<|im_end|> naïve café"
    assert tok_cached.encode(text) == tok_parsed.encode(text)
    assert tok_cached.chat_template == tok_parsed.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert tok_cached.apply_chat_template(messages, tokenize=False) == tok_parsed.apply_chat_template(
        messages, tokenize=False
    )
    # Whatever the cache holds is keyed by the file's size and mtime: a touched file is read anew.
    st = path.stat()
    key_before = cached.cache
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert GGUFFile(path).cache != key_before
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_header_reader_matches_gguf_package_and_tokenizer_matches_autotokenizer(tmp_path, monkeypatch):
    """kvloom reads GGUF headers itself (GGUFReader takes seconds) and converts the tokenizer without
    AutoTokenizer's detour: both give what the reference implementations give."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from kvloom.loader.gguf import TensorInfo, read_header

    path = default_model_path()
    metadata, tensors = read_header(path)
    reader = GGUFReader(path)
    assert tensors == [
        TensorInfo(
            t.name,
            int(t.tensor_type),
            [int(d) for d in reversed(t.shape)],
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == set(metadata)
    for key, value in fields.items():
        if isinstance(value, list) and len(value) > 64:
            assert metadata[key] == {"length": len(value)}, key
        elif isinstance(value, float):
            assert metadata[key] == pytest.approx(value), key
        else:
            assert metadata[key] == value, key

    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    ours = GGUFFile(path).load_tokenizer()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours.hf) is type(ref)  # the class behind kvloom's FastTokenizer
    for text in [
        "Hello world!",
        "  two spaces\n\nnew lines\ttab",
        "<|im_start|>user\nHi<|im_end|>",
        "naïve 日本語 🙂",
    ]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    messages = [{"role": "user", "content": "hi"}]
    kw = dict(tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, **kw) == ref.apply_chat_template(messages, **kw)
    assert ours.all_special_tokens == ref.all_special_tokens
