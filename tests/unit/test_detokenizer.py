"""Incremental detokenization equals decoding the whole sequence, for both tokenizer kinds."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvloom.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world! Once upon a time, there was a little girl.",
    "Emoji 🎉🚀 and a family 👨‍👩‍👧 split over byte tokens.",
    "中文字符和日本語のテキスト",
    "def f(x):\n    return  x  *  2\n\n\n\tdone",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level-bpe"])
def tokenizer(request, stories):
    if request.param == "sentencepiece":
        return AutoTokenizer.from_pretrained(stories)
    from kvloom.loader.checkpoint import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_text(tokenizer, text):
    prompt = tokenizer("Prompt:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_token(t) for t in ids]
    assert "".join(deltas) == detok.text
    assert "\ufffd" not in detok.text  # never emits half a UTF-8 character
    full = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    assert tokenizer.decode(prompt, skip_special_tokens=True) + detok.text == full


def test_special_tokens_skipped_or_kept(tokenizer):
    prompt = tokenizer("Hi").input_ids
    eos = tokenizer.eos_token_id
    ids = tokenizer(" there", add_special_tokens=False).input_ids + [eos]
    skipped = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    kept = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False)
    for t in ids:
        skipped.add_token(t)
        kept.add_token(t)
    assert tokenizer.eos_token not in skipped.text
    assert kept.text.endswith(tokenizer.eos_token)


def test_backend_decoder_gives_what_decode_gives(tokenizer, stories):
    """The detokenizer decodes on the `tokenizers` backend where the tokenizer's own decode runs just that;
    with clean-up on (a WordPiece-style tokenizer), or a decode of its own, it keeps tokenizer.decode."""
    from kvloom.tokenizer import decoder

    ids = tokenizer(" ".join(TEXTS) + " isn't it , yes .", add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    dec = decoder(tokenizer)
    for skip in (True, False):
        for n in (1, 2, 7, len(ids)):
            assert dec(ids[:n], skip) == tokenizer.decode(ids[:n], skip_special_tokens=skip)
    cleaning = AutoTokenizer.from_pretrained(stories, clean_up_tokenization_spaces=True)
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    text_ids = cleaning("isn't it , yes .", add_special_tokens=False).input_ids
    assert decoder(cleaning)(text_ids, True) == cleaning.decode(text_ids, skip_special_tokens=True)
    assert cleaning.decode(text_ids, skip_special_tokens=True) != cleaning.backend_tokenizer.decode(text_ids)
