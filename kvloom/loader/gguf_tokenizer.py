"""A GGUF file's byte-level BPE tokenizer as a `tokenizers` backend, without transformers.

transformers' GGUF tokenizer conversion costs a first start 2-3 s: its import (1.3-2 s) and a parse of
the whole header. For the common case, a GPT-2-style byte-level BPE vocabulary (`tokenizer.ggml.model`
"gpt2") that splits text with GPT-2's own regex, kvloom builds the same backend from the header itself:

- the BPE model over the file's tokens (ids = positions) and merges, with no unknown token, dropout, or
  subword prefix/suffix;
- byte-level pre-tokenization (GPT-2's regex, no prefix space) and decoding; no normalizer;
- a post-processor that adds nothing (no BOS/EOS: only files that ask for neither take this path);
- the tokens the file types CONTROL (3) as special added tokens, USER_DEFINED (4) as plain added ones,
  all matched whole and unnormalized.

What it makes is tested to equal transformers' conversion (the backend's JSON, and the tokenizer
transformers builds from the saved files: encodes, decodes, chat template). Any other file (sentencepiece
vocabularies, pre-tokenizers with their own regex, BOS/EOS added) returns None here and goes to
transformers, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# `tokenizer.ggml.pre` values whose text splitting is GPT-2's regex (what ByteLevel's use_regex applies).
# Others (llama3, qwen2, ...) each need their own regex, which transformers knows; they go there.
PLAIN_GPT2_PRE = frozenset({"gpt-2", "smollm"})

_CONTROL, _USER_DEFINED = 3, 4
_ENDOFTEXT = "<|endoftext|>"
TOKENIZER_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"})


def _byte_spelling() -> dict[int, str]:
    """The characters byte-level BPE spells bytes with: printable Latin-1 bytes stand for themselves,
    every other byte for chr(256 + its rank among them)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + i)
    return spelling


def convert(metadata: dict) -> tuple[str, dict, dict] | None:
    """(the backend's JSON, the ids and template FastTokenizer keeps, tokenizer_config.json) for a GGUF
    header read with TOKENIZER_KEYS in full, or None where transformers must convert it."""
    get = metadata.get
    tokens, merges, types = (
        get("tokenizer.ggml.tokens"),
        get("tokenizer.ggml.merges"),
        get("tokenizer.ggml.token_type"),
    )
    if (
        get("tokenizer.ggml.model") != "gpt2"
        or get("tokenizer.ggml.pre") not in PLAIN_GPT2_PRE
        or get("tokenizer.ggml.add_bos_token")
        or get("tokenizer.ggml.add_eos_token")
        or get("tokenizer.ggml.add_space_prefix")
        or not isinstance(tokens, list)
        or not isinstance(merges, list)
        or not isinstance(types, list)
        or len(types) != len(tokens)
    ):
        return None
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet is spelled in it (its UTF-8 bytes), as the BPE model needs.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    if len(vocab) != len(tokens):
        return None  # duplicate spellings: leave the ambiguity to transformers
    # transformers' byte-level tokenizer always has GPT-2's <|endoftext|> as a special token (and adds it
    # to a vocabulary without one: then it is transformers' to convert).
    if _ENDOFTEXT not in vocab:
        return None
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ")) for m in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    # CONTROL tokens spelled outside the byte alphabet are llama.cpp mislabels: adding them would grow the
    # vocabulary past the model's, so they stay plain vocabulary entries.
    control = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL and set(t) <= alphabet]
    if _ENDOFTEXT not in control:
        control.append(_ENDOFTEXT)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        return None

    def token(key: str) -> str | None:
        i = get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    named = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id")}
    named |= {"unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    ids = {name: vocab.get(t) if t is not None else None for name, t in named.items()}
    special_ids = []  # transformers' order: bos, eos, unk, pad; each once
    for i in ids.values():
        if i is not None and i not in special_ids:
            special_ids.append(i)
    template = get("tokenizer.chat_template")
    info = {
        "eos_token_id": ids["eos_token"],
        "bos_token_id": ids["bos_token"],
        "pad_token_id": ids["pad_token"],
        "chat_template": template if isinstance(template, str) else None,
        "all_special_ids": special_ids,
        "len": len(tokens),
        "clean_up": False,  # transformers never cleans up BPE decodes
    }
    config = {
        "backend": "tokenizers",
        **{name: t for name, t in named.items() if t is not None},
        "model_max_length": 1000000000000000019884624838656,  # transformers' "no limit"
        "tokenizer_class": "TokenizersBackend",
    }
    return tok.to_str(), info, config


def save_for_transformers(path: Path, backend_json: str, config: dict, chat_template: str | None) -> None:
    """The files transformers' AutoTokenizer.from_pretrained(path) reads (FastTokenizer.hf builds from
    them when something beyond encode/decode is asked for)."""
    (path / "tokenizer.json").write_text(backend_json)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
