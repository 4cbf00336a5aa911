"""Request: the engine's per-request state. The scheduler is its only writer (the engine adds it, the
proposer and the outputs read it); the model runner keeps a state of its own, fed by SchedulerOutput."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvloom.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # NOTE: every status after PREEMPTED is a finished one (see is_finished).
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the chosen token's, its rank (1 = likeliest), and the top-N."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class RequestMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


class TokenIds:
    """Counts and slices of ``prompt_token_ids + output_token_ids``, for the classes that hold both (the
    scheduler's Request, the runner's NewRequestData, the sampler's SampleRow)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids in [start, end) of prompt + output, without building the whole list."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]


@dataclass
class Request(TokenIds):
    """One generation request.

    ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (tokens whose KV is cached) drive
    scheduling: each step the scheduler catches the latter up to the former (see docs/architecture.md).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    prompt: str | None = None
    # Sample index within its group (n / best_of > 1 fan out into one Request per sample).
    index: int = 0
    # Scheduling: lower priority values go first (policy "priority"); user for policy "fair".
    priority: int = 0
    user: str | None = None
    # Requests with different salts never share prefix-cache blocks.
    cache_salt: str | None = None
    arrival_seq: int = -1  # set by the scheduler
    # Prompt tokens found in the prefix cache at first admission (None until admitted).
    num_cached_tokens: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # The stop string or stop token id that finished the request, if any.
    stop_reason: str | int | None = None
    # Sum of the sampled tokens' logprobs (kept when logprobs or best_of ask for it).
    cumulative_logprob: float = 0.0
    # Logprobs of prompt tokens 1.. (when prompt_logprobs asks), filled chunk by chunk.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Speculative decoding: tokens proposed for the positions after the last one, verified in the next
    # step as extra tokens of the request (the proposer's, set by the scheduler for the step), and the
    # proposer's distributions they were drawn from ([k, vocab] float32; None for a point mass: ngram).
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: Any = None
    # Structured outputs: the request's grammar matcher (xgrammar), advanced by every token appended.
    grammar: Any = None

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def cache_key(self) -> str | None:
        """Extra key of the first block's hash (adapter ids will join the salt here)."""
        return self.cache_salt
