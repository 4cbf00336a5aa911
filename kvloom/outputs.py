"""What the engine returns to callers."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvloom.request import RequestMetrics


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str


# One position: token id -> Logprob, holding the top-N and the chosen token.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    # The stop string or stop token id that ended this completion (None for EOS or length).
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Cumulative state of one request: ``outputs[i].text`` grows step by step until ``finished``.

    While a request runs, text that could still turn out to be the start of a stop string is held back,
    so a stream never shows any part of a stop string.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # One entry per prompt token (None for the first), when prompt_logprobs was asked for.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Prompt tokens served from the prefix cache instead of being computed.
    num_cached_tokens: int = 0
