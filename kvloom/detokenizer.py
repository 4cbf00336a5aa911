"""Incremental detokenization and stop strings: new token ids -> text, exact for byte-level BPE and
sentencepiece, never showing any part of a stop string unless asked."""

from __future__ import annotations

from typing import Any

from kvloom.tokenizer import decoder

# Prompt tokens kept as left context, so a delta gets the leading space a sentencepiece token implies.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing window and keeps only text that can no longer change.

    ``prefix_offset..read_offset`` is text already emitted; decoding from ``prefix_offset`` to the end
    and cutting the prefix's text off gives the delta. A window ending in U+FFFD is an incomplete UTF-8
    sequence (an emoji split over byte tokens): wait for the next token.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self._decode_ids = decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._checked = 0  # text before this index was searched for stop strings

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self.skip_special_tokens)

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

    def find_stop(self, active: bool = True) -> str | None:
        """Look for a stop string ending in the text added since the last call. On a match, cut the text
        at the stop string (keeping it if asked) and return it. ``active=False`` (before min_tokens) only
        marks the new text as searched, so stop strings in it never count."""
        if not self.stop:
            return None
        start = max(0, self._checked - self._max_stop_len + 1)
        self._checked = len(self.text)
        if not active:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def output_text(self, finished: bool) -> str:
        """The text safe to show: while running, hold back a tail that could begin a stop string."""
        if finished or self.include_stop or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]
