"""A Hugging Face fast tokenizer's hot path without importing transformers.

Importing transformers costs 1.3-2 s of every start (its package init maps every model module), more than
a third of `kvloom generate`'s cold start on the default model. `FastTokenizer` encodes and decodes on the
`tokenizers` backend that transformers' fast tokenizer wraps, saved from that tokenizer once (its
*effective* backend, after transformers adjusted it at load, so ids match), and hands every other
attribute (apply_chat_template, ...) to the transformers tokenizer, which it builds on first use.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import Tokenizer

_BACKEND = "kvloom_backend.json"
_INFO = "kvloom_tokenizer.json"
_VERSION = 1


def _hf_decode_cleans_up(hf: Any) -> bool:
    """Whether transformers' decode post-processes the backend's text (clean_up_tokenization)."""
    if not getattr(hf, "clean_up_tokenization_spaces", False):
        return False
    bpe = type(hf.backend_tokenizer.model).__name__ == "BPE"
    return not bpe or bool(
        getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )


def decoder(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """`(ids, skip_special_tokens) -> text`, as `tokenizer.decode` gives it, on the `tokenizers` backend
    when that is what the tokenizer's decode runs: a transformers fast tokenizer whose decode and _decode
    are the library's own and that applies no clean-up. On SmolLM2's tokenizer a call takes 2.7 us this
    way against 6.0 through transformers, and the detokenizer decodes twice per generated token (~0.2 ms
    of a 32-row decode step)."""
    # NOTE: FastTokenizer decodes on its backend already, and asking it for an attribute it lacks would
    # load the transformers tokenizer.
    backend = None if isinstance(tokenizer, FastTokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        from transformers import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        cls = type(tokenizer)
        own = cls.decode is PreTrainedTokenizerBase.decode and cls._decode is TokenizersBackend._decode
        if own and not _hf_decode_cleans_up(tokenizer):
            return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


# Token lists longer than this are decoded off the GIL; shorter ones (the detokenizer's per-token calls,
# 2.7 us) keep the cheaper call.
_LONG_DECODE = 4096


class FastTokenizer:
    """encode / __call__ / decode / special token ids natively; anything else from `self.hf`."""

    def __init__(self, path: Path, backend_json: str, info: dict, hf: Any = None) -> None:
        self.path = path
        self._json = backend_json
        self._backend = Tokenizer.from_str(backend_json)
        self._info = info
        self._hf = hf
        self.eos_token_id: int | None = info["eos_token_id"]
        self.bos_token_id: int | None = info["bos_token_id"]
        self.pad_token_id: int | None = info["pad_token_id"]
        self.chat_template: str | None = info["chat_template"]
        self.all_special_ids: list[int] = info["all_special_ids"]
        self.name_or_path: str = info["name_or_path"]

    # -- saved beside the transformers tokenizer -----------------------------------------------------
    @staticmethod
    def save(hf: Any, path: Path) -> tuple[str, dict]:
        """Write what `load` needs, from a transformers fast tokenizer saved (save_pretrained) at path;
        returns what it wrote (the backend's JSON, the info)."""
        info = {
            "eos_token_id": hf.eos_token_id,
            "bos_token_id": hf.bos_token_id,
            "pad_token_id": hf.pad_token_id,
            "chat_template": hf.chat_template if isinstance(hf.chat_template, str) else None,
            "all_special_ids": list(hf.all_special_ids),
            "name_or_path": str(hf.name_or_path),
            "len": len(hf),
            "clean_up": _hf_decode_cleans_up(hf),
        }
        return FastTokenizer.write(path, hf.backend_tokenizer.to_str(), info)

    @staticmethod
    def write(path: Path, backend: str, info: dict) -> tuple[str, dict]:
        """Write a backend's JSON and its info (save's fields; "version" is added) for `load`."""
        info = {"version": _VERSION, **info}
        # The backend first, each file whole (a replace): a reader that finds the info finds the backend.
        for name, text in ((_BACKEND, backend), (_INFO, json.dumps(info))):
            tmp = path / f".{name}.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, path / name)
        return backend, info

    @classmethod
    def load(cls, path: Path, hf: Any = None) -> FastTokenizer | None:
        """The tokenizer saved at path (over `hf`, the transformers tokenizer it was saved from, when the
        caller has it), or None when `save` has not written it (or an older version did)."""
        try:
            info = json.loads((path / _INFO).read_text())
            if info.get("version") != _VERSION:
                return None
            return cls(path, (path / _BACKEND).read_text(), info, hf)
        except (OSError, ValueError, KeyError):
            return None
        except Exception:  # noqa: BLE001 - tokenizers' parse errors are plain Exceptions
            return None

    @classmethod
    def wrap(cls, hf: Any, path: Path) -> FastTokenizer:
        """A FastTokenizer over an already loaded transformers tokenizer saved at path (no second load)."""
        return cls(path, *cls.save(hf, path), hf)

    # -- the transformers tokenizer, for everything else --------------------------------------------
    @property
    def hf(self) -> Any:
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.path)
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        # NOTE: this tokenizer's template, which may be kvloom's for a file that has none (the
        # transformers tokenizer, loaded from the file, would not know it)
        if self.chat_template is not None:
            kwargs.setdefault("chat_template", self.chat_template)
        return self.hf.apply_chat_template(conversation, **kwargs)

    def __deepcopy__(self, memo: dict) -> FastTokenizer:
        hf = None if self._hf is None else copy.deepcopy(self._hf, memo)
        tok = FastTokenizer(self.path, self._json, self._info, hf)
        tok.chat_template = self.chat_template
        return tok

    # -- the hot path ---------------------------------------------------------------------------------
    # Anything beyond one string / a list of ids and these arguments (batches, tensors, truncation, ...)
    # goes to the transformers tokenizer.
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs or not isinstance(text, str):
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        # NOTE: encode_batch, not encode: the same ids at the same speed (12-13 us for a sentence), but it
        # lets go of the GIL, so a server thread tokenizing a 4 MiB prompt (3 s) does not stall the event
        # loop (encode held it throughout).
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """Like transformers' tokenizer(text) for one string: `.input_ids` (and `.attention_mask`)."""
        if kwargs or not isinstance(text, str):
            return self.hf(text, add_special_tokens=add_special_tokens, **kwargs)
        ids = self.encode(text, add_special_tokens)
        return SimpleNamespace(input_ids=ids, attention_mask=[1] * len(ids))

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if kwargs or self._info["clean_up"] or not isinstance(token_ids, list):
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if len(token_ids) > _LONG_DECODE:  # decode_batch lets go of the GIL (see encode)
            return self._backend.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0]
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def __len__(self) -> int:
        return self._info["len"]
