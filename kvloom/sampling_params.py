"""SamplingParams: how one request is decoded, validated once at construction."""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import dataclass, field

# NOTE: the most top-N logprobs a request may ask for (as vLLM's default max_logprobs and OpenAI's
# top_logprobs limit); each one costs a decode of a token string per step.
MAX_LOGPROBS = 20
# Integers (seeds, counts, top_k) must fit in a signed 64-bit integer, as torch tensors and
# torch.Generator.manual_seed take them.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    """A finite real number (NaN, +-inf and bools are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A format the output must follow, enforced token by token (vLLM's ``structured_outputs``): exactly
    one of a JSON schema (a dict, or its JSON text), any JSON object, a regular expression, one of a list
    of strings, or an EBNF grammar (xgrammar's dialect, which reads GBNF)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs: give exactly one of json, json_object, regex, choice, grammar"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.json_object not in (True, False):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = jsonlib.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json: not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec as text): what a compiled grammar is cached under."""
        kind = self.kind
        if kind == "json":
            spec = self.json if isinstance(self.json, str) else jsonlib.dumps(self.json)
        elif kind == "choice":
            spec = jsonlib.dumps(self.choice)
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return kind, spec


@dataclass
class SamplingParams:
    """Decoding parameters of one request, as OpenAI and vLLM define them.

    - temperature: 0 means greedy. top_k: -1 disables it. top_p in (0, 1]. min_p in [0, 1]: drop tokens
      whose probability is below min_p times the most likely token's.
    - repetition_penalty (> 0, 1 = off): divides positive / multiplies negative logits of every token seen
      in the prompt or output. presence_penalty and frequency_penalty (in [-2, 2]) subtract
      ``presence * (count > 0) + frequency * count`` over the generated tokens.
    - logit_bias: token id -> bias in [-100, 100], added to the logits.
    - seed: per-request randomness, independent of the rest of the batch.
    - min_tokens: EOS, stop_token_ids and stop strings are suppressed until this many tokens exist.
    - stop: strings that end the output (never included unless include_stop_str_in_output).
    - logprobs: top-N logprobs of each generated token (plus the sampled token's own);
      prompt_logprobs: the same for each prompt token.
    - n: completions returned; best_of: completions generated (the n with the highest cumulative
      logprob are returned). They share the prompt's KV blocks.
    - structured_outputs: a format the output must follow (StructuredOutputsParams, or a dict of its
      fields), enforced token by token.

    Invalid values raise ``ValueError`` naming the field, before any engine state is touched.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_int("n", 1)
        if self.best_of is not None:
            self._check_int("best_of", 1)
            if self.best_of < self.n:
                raise ValueError(f"best_of must be >= n ({self.n}), got {self.best_of}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1) or self.top_k > INT64_MAX:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            value = self.repetition_penalty
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                kind = type(self.logit_bias).__name__
                raise ValueError(f"logit_bias must map token ids to biases, got {kind}")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)  # OpenAI clients send JSON keys as strings
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {token!r}") from None
                if token_id < 0 or not _is_number(value) or not -100.0 <= value <= 100.0:
                    raise ValueError(f"logit_bias[{token!r}]: need a token id >= 0 and a bias in [-100, 100]")
                bias[token_id] = float(value)
            self.logit_bias = bias
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer in [-2^63, 2^63 - 1], got {self.seed!r}")
        self._check_int("max_tokens", 1)
        self._check_int("min_tokens", 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or any(
            not _is_int(t) or t < 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            if not isinstance(self.structured_outputs, dict):
                raise ValueError(
                    "structured_outputs must be a StructuredOutputsParams or a dict of its fields"
                )
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.stop_token_ids = list(self.stop_token_ids)

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if not _is_int(value) or not minimum <= value <= INT64_MAX:
            raise ValueError(f"{name} must be an integer in [{minimum}, 2^63 - 1], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences generated for this request (best_of, else n)."""
        return self.best_of or self.n

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_sampled_logprob(self) -> bool:
        """Whether the sampled token's logprob is needed (logprobs output, or ranking best_of samples)."""
        return self.logprobs is not None or self.num_samples > self.n
