"""Incremental detokenization: new token ids -> text deltas, exact for byte-level BPE and sentencepiece."""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context, so a delta gets the leading space a sentencepiece token implies.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing window and emits only text that can no longer change.

    ``prefix_offset..read_offset`` is text already emitted; decoding from ``prefix_offset`` to the end
    and cutting the prefix's text off gives the delta. A window ending in U+FFFD is an incomplete UTF-8
    sequence (an emoji split over byte tokens): wait for the next token.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
