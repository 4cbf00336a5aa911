"""Formats as grammars, one matcher per request, and each step's token bitmask: llguidance.

Chosen over xgrammar by measurement (bench/structured.py and the notes of issue 20; SmolLM2's 49152-token
vocabulary, one CPU thread): a new JSON schema costs llguidance 0.5-1 ms before its first mask and
xgrammar 6.5 ms (it precomputes masks over the whole vocabulary), which on a short chat prompt is +29% time
to first token against the 20% allowed; per token llguidance's mask is slower (60 vs 12 us), 2 ms of a
~100 ms 32-row step. llguidance installs in 8 MB with no dependencies; xgrammar pulls triton (1 GB) on
Linux. Both write the same bitmask layout (bitmask.py).

A request's matcher lives on its ``Request`` (``grammar``) and advances only by tokens the scheduler
appends (Scheduler.update_from_output): a preemption or recompute changes nothing in it. Filling the
bitmask of a step whose request carries proposals advances the matcher through them (one row after each)
and rolls it back; rows after a proposal the grammar forbids stay unconstrained (verification rejects
that proposal first, so they are never used).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from kvloom.logger import init_logger
from kvloom.sampling_params import StructuredOutputsParams

logger = init_logger(__name__)

_CACHE_SIZE = 256  # matchers kept as templates, by spec (least recently used dropped)
# JSON as json.dumps writes it (", " and ": "), no free whitespace: what models usually write, and no
# room for a model to loop on spaces and newlines until max_tokens.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type": "object"}'


class StructuredOutputs:
    """One engine's grammars: checked, cached as template matchers, copied for each request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._ll_tokenizer = None
        self._lock = threading.Lock()  # the tokenizer's creation, the cache (the server checks off-loop)
        self._templates: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def _tokenizer(self):  # noqa: ANN202 - llguidance.LLTokenizer
        if self._ll_tokenizer is None:
            import llguidance.hf

            hf = getattr(self.tokenizer, "hf", self.tokenizer)  # kvloom's FastTokenizer: its transformers one
            eos = sorted(self.eos_token_ids) or None
            self._ll_tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos)
            logger.info("Structured outputs: llguidance tokenizer ready")
        return self._ll_tokenizer

    def matcher(self, params: StructuredOutputsParams, field: str = "structured_outputs"):  # noqa: ANN201
        """A fresh matcher for ``params`` (copied from a cached template); a ValueError naming ``field``
        when the format is invalid or unsupported. Cheap after the first request of a spec."""
        from llguidance import LLMatcher

        key = params.key
        with self._lock:
            template = self._templates.get(key)
            if template is None:
                grammar = _grammar(params, field)
                error = LLMatcher.validate_grammar(grammar)
                if error:
                    raise ValueError(f"{field}: the {params.kind} does not compile: {error.strip()}")
                template = LLMatcher(self._tokenizer(), grammar)
                if template.is_error():
                    raise ValueError(f"{field}: the {params.kind} does not compile: {template.get_error()}")
                self._templates[key] = template
                if len(self._templates) > _CACHE_SIZE:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(key)
            return template.deep_copy()

    def bitmask(self, out, requests: dict):  # noqa: ANN001, ANN201 - SchedulerOutput
        """(bitmask [rows, ceil(V / 32)] int32, request id -> its first row) for the step's constrained
        sampling requests (1 + proposals rows each), or None when none is constrained."""
        rows: dict[str, int] = {}
        n = 0
        for s in out.scheduled:
            r = requests.get(s.request_id)
            if s.samples and r is not None and r.grammar is not None:
                rows[s.request_id] = n
                n += 1 + s.num_spec
        if not rows:
            return None
        import llguidance.torch as llt

        bitmask = llt.allocate_token_bitmask(n, self.vocab_size)  # all allowed
        for s in out.scheduled:
            base = rows.get(s.request_id)
            if base is None:
                continue
            m = requests[s.request_id].grammar
            accepted = 0
            for j in range(s.num_spec + 1):
                if m.is_stopped():  # a proposed stop token ended it: the rows after are never used
                    break
                llt.fill_next_token_bitmask(m, bitmask, base + j)
                # NOTE: try_consume_tokens, not consume_token: a token the grammar forbids puts the matcher
                # in an error state that rollback does not undo; this consumes only a valid one
                if j == s.num_spec or not m.try_consume_tokens(s.spec_token_ids[j : j + 1]):
                    break
                accepted += 1
            if accepted:
                m.rollback(accepted)
        return bitmask, rows


def _grammar(params: StructuredOutputsParams, field: str) -> str:
    """The format as an llguidance grammar (JSON schema, regex, or Lark; GBNF is converted)."""
    from llguidance import LLMatcher

    kind, spec = params.key
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_STYLE)
        if kind == "json_object":  # an object, as OpenAI's json_object promises (not any JSON value)
            return LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_STYLE)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            choices = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return LLMatcher.grammar_from_lark(f"start: {choices}")
        if "::=" in spec:  # GBNF / EBNF (llama.cpp's, xgrammar's)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            spec = gbnf_to_lark(spec)
        return LLMatcher.grammar_from_lark(spec)
    except Exception as e:  # noqa: BLE001 - the GBNF converter raises plain Exception
        raise ValueError(f"{field}: the {kind} does not compile: {e}") from None


def matcher_bitmask(matchers: dict[str, Any], vocab_size: int) -> tuple[Any, dict[str, int]]:
    """One bitmask row per matcher in its current state (a draft model's pass): (bitmask, id -> row)."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(matchers), vocab_size)
    rows = {}
    for i, (rid, m) in enumerate(matchers.items()):
        llt.fill_next_token_bitmask(m, bitmask, i)
        rows[rid] = i
    return bitmask, rows
