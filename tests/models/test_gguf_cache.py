"""The per-file GGUF cache (tensor table, config, converted tokenizer) gives what parsing the file gives."""

from __future__ import annotations

import os

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
