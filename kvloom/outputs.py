"""What the engine returns to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvloom.request import RequestMetrics


class RequestOutputKind(enum.Enum):
    """What ``LLMEngine.step()`` returns of a request (vLLM's names).

    CUMULATIVE: after each step that gave it tokens, everything so far. DELTA: only what is new since its
    last output (text, token ids, logprobs; prompt logprobs once), so a stream costs what it sends, not
    its length, each step. FINAL_ONLY: one output, when it has finished.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


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
    # Tokens generated so far (with RequestOutputKind.DELTA, token_ids holds only the new ones).
    num_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """State of one request: ``outputs[i].text`` grows step by step until ``finished`` (cumulative; with
    RequestOutputKind.DELTA each output holds what is new, and lists only the samples that have news).

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
