"""The scheduler: one rule, iteration-level continuous batching under a token budget.

Each step, every scheduled request gets tokens so that ``num_computed_tokens`` catches up with
``num_tokens``: running requests first (a decode needs one token, an unfinished prefill a chunk), then
waiting ones in policy order. Chunked prefill, prefill/decode mixing, prefix-cache hits (a request starts
with ``num_computed_tokens > 0``) and recompute after preemption all fall out of this rule; there is no
prefill phase and no decode phase.

Speculative decoding rides on the same rule: a proposer sets ``request.spec_token_ids`` before the step,
and the request's uncomputed tokens then include them (a decode becomes 1 + k tokens, scored in the one
forward pass). ``update_from_output`` counts only the accepted ones as computed and rolls the KV slots of
the rejected ones back.

Policies (the order of the waiting queue, and who is preempted):
- ``fcfs``: arrival order; when blocks run out, the newest running request is preempted.
- ``priority``: (priority, arrival), lower values first. ``running`` is kept in that order, so the
  preemption victim is always the lowest-priority request, and a waiting request that outranks it takes
  its place when the batch is full or out of blocks.
- ``fair``: Virtual Token Counters (Sheng et al., OSDI 2024): the waiting request of the user with the
  least service so far goes first; service = prompt tokens (charged at admission) + 2 x tokens generated,
  and a user who becomes active again is lifted to the least counter among active users (no banking of
  idle time).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvloom.config import SCHEDULING_POLICIES
from kvloom.core.kv_cache_manager import KVCacheManager
from kvloom.logger import init_logger
from kvloom.request import Request, RequestStatus, TokenIds, TokenLogprobs
from kvloom.sampling_params import SamplingParams

logger = init_logger(__name__)
POLICIES = SCHEDULING_POLICIES
# VTC weights of prompt and generated tokens (the paper's defaults).
_W_PROMPT, _W_OUTPUT = 1.0, 2.0


@dataclass
class NewRequestData(TokenIds):
    """A request the model runner has not seen (or sees again after a preemption): sent once, then kept
    by the runner as its own state of the request (outputs and prompt-logprobs progress updated by each
    step's ScheduledRequest), which is what building inputs, sampling and verification read."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # a copy: the runner's own list from here on
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    index: int  # sample index within its group (seeded sampling keys on it)
    num_prompt_logprobs: int  # prompt positions that already have logprobs (not computed again)

    @staticmethod
    def of(request: Request) -> NewRequestData:
        return NewRequestData(
            request.request_id,
            request.prompt_token_ids,
            list(request.output_token_ids),
            request.sampling_params,
            request.eos_token_ids,
            request.index,
            len(request.prompt_logprobs),
        )


@dataclass
class ScheduledRequest:
    """One request's share of a step, as plain data (the runner keeps its own per-request state)."""

    request_id: str
    start: int  # tokens whose KV is cached (the first position computed this step)
    num_new_tokens: int
    block_ids: list[list[int]]  # one block table per KV group (KVLayout)
    # Whether this step reaches the end of the request's tokens, so its last logits are sampled.
    samples: bool
    # Speculative tokens at the end of this step's tokens (all of the request's proposals that fit): the
    # last 1 + num_spec rows are sampled and verified.
    spec_token_ids: list[int] = field(default_factory=list)
    # The runner's output tokens become output_token_ids[:output_start] + new_token_ids.
    output_start: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new: NewRequestData | None = None  # first sight (or after a preemption)

    @property
    def num_spec(self) -> int:
        return len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    """The contract between scheduler and model runner for one step: plain data (request ids, new token
    ids, positions, block ids; sampling parameters of requests new to the runner)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests the runner knew that finished since the last step: it drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    # The draft's distributions of the scheduled proposals ([k, vocab] float32; point masses: absent).
    spec_probs: dict[str, Any] = field(default_factory=dict)
    # Structured outputs: (token bitmask [rows, ceil(V / 32)] int32, request id -> its first row, one row
    # per sampled row), filled by the engine after scheduling; None when no request is constrained.
    grammar: tuple[Any, dict[str, int]] | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        policy: str = "fcfs",
        num_lookahead_tokens: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.kv = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.policy = policy
        # Slots past every running request's scheduled tokens that stay allocated for a draft model's
        # K/V of its proposals (the draft writes its own pool at the same blocks).
        self.lookahead = num_lookahead_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # parent request id -> samples that fork from it once its prompt is computed (n / best_of > 1)
        self._forks: dict[str, list[Request]] = {}
        self._seq = itertools.count()
        self.user_counters: dict[str | None, float] = {}
        self._active_per_user: Counter[str | None] = Counter()
        self.num_preemptions = 0
        # request id -> output tokens the model runner has of it (absent: it has no state of it)
        self._runner_outputs: dict[str, int] = {}
        self._runner_dropped: list[str] = []  # finished since the last step, known to the runner

    # ---- queue management -------------------------------------------------------------------------
    def add_request(self, request: Request, forks: list[Request] | None = None) -> None:
        """Queue a request. ``forks`` are further samples of the same prompt: they wait until the prompt is
        computed once, then share its full KV blocks by reference count and continue on their own."""
        group = [request, *(forks or [])]
        for r in group:
            if r.request_id in self.requests:
                raise ValueError(f"request_id {r.request_id!r} is already in use")
        seq = next(self._seq)
        if self.policy == "fair" and self._active_per_user[request.user] == 0:
            active = [self.user_counters[u] for u, n in self._active_per_user.items() if n > 0]
            floor = min(active) if active else 0.0
            self.user_counters[request.user] = max(self.user_counters.get(request.user, 0.0), floor)
        for r in group:
            r.arrival_seq = seq  # forks share it: they belong to an already admitted request
            self.requests[r.request_id] = r
            self._active_per_user[r.user] += 1
        self.waiting.append(request)
        if forks:
            self._forks[request.request_id] = list(forks)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Finish (e.g. abort) requests wherever they are; unknown or finished ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            else:  # a sample still waiting to fork from its parent
                for forks in self._forks.values():
                    if request in forks:
                        forks.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _key(self, r: Request) -> tuple:
        if self.policy == "priority":
            return (r.priority, r.arrival_seq)
        if self.policy == "fair":
            return (self.user_counters.get(r.user, 0.0), r.arrival_seq)
        return (r.arrival_seq,)

    def _next_waiting(self) -> Request:
        return min(self.waiting, key=self._key)

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self, proposals: dict[str, tuple[list[int], Any]] | None = None) -> SchedulerOutput:
        """One step's work. ``proposals``: speculative tokens per decoding request (and the draft's
        distributions, or None), from the proposer; they join the request's uncomputed tokens."""
        out = SchedulerOutput(finished_request_ids=self._runner_dropped)
        self._runner_dropped = []
        proposals = proposals or {}
        for request in self.running:
            request.spec_token_ids, request.spec_probs = proposals.get(request.request_id, ([], None))
        budget = self.max_num_batched_tokens
        if self.policy == "priority":
            self._preempt_for_priority(out, budget)

        i = 0
        out_of_blocks = False
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            # NOTE: keep one token of budget for every running request after this one, so a long
            # prefill chunk can never starve the decodes behind it.
            reserve = len(self.running) - i - 1
            num_new = min(
                request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens,
                max(1, budget - reserve),
            )
            while not self.kv.allocate_slots(request, num_new + self.lookahead):
                # Out of blocks: preempt the last running request (the newest, or the lowest-priority).
                victim = self.running.pop()
                self._preempt(victim, out)
                out_of_blocks = True
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new, out))
                budget -= num_new
                i += 1

        # Waiting requests are admitted only when memory did not run out this step, so a just-preempted
        # request is not displaced by a newer one.
        while not out_of_blocks and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self._next_waiting()
            fresh = request.num_computed_tokens == 0 and not any(self.kv.get_block_ids(request.request_id))
            hits = self.kv.get_computed_blocks(request) if fresh else None
            num_cached = len(hits[0]) * self.kv.block_size if hits else 0
            num_new = min(request.num_tokens - request.num_computed_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new + self.lookahead, hits):
                break
            if fresh:
                request.num_computed_tokens = num_cached
                self.kv.record_lookup(request.num_tokens, num_cached)
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = num_cached
            self.waiting.remove(request)
            if self.policy == "fair":
                # VTC charges the prompt at admission, so one admission round alternates between users.
                self._charge(request.user, _W_PROMPT * (request.num_tokens - request.num_computed_tokens))
            request.status = RequestStatus.RUNNING
            if self.policy == "priority":
                bisect.insort(self.running, request, key=self._key)
            else:
                self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new, out))
            budget -= num_new
        return out

    def _preempt_for_priority(self, out: SchedulerOutput, budget: int) -> None:
        """Make room for the best waiting request by preempting running ones it outranks."""
        while self.waiting and self.running:
            head = self._next_waiting()
            victim = self.running[-1]
            if self._key(victim) <= self._key(head):
                return
            first_chunk = min(head.num_tokens - head.num_computed_tokens, budget)
            fits = self.kv.num_free_blocks >= self.kv.num_blocks_for(head.num_computed_tokens + first_chunk)
            if len(self.running) < self.max_num_seqs and fits:
                return
            self.running.pop()
            self._preempt(victim, out)

    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled: dict[str, list[int]],
        on_token: Callable[[Request, int, int], str | None] | None = None,
        logprobs: dict[str, list[TokenLogprobs]] | None = None,
        prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None,
    ) -> list[Request]:
        """Advance computed tokens, cache full blocks, append sampled tokens, fork samples, finish requests.

        ``sampled``: each sampling request's new tokens, in order (more than one after speculation: the
        accepted proposals, then the target's own token). They are appended one by one and the rest are
        dropped once one of them finishes the request. ``on_token(request, i, token)`` is called after
        the i-th is appended and returns a stop string the text now contains (the detokenizer's), or None.
        ``logprobs``: the sampled tokens' (summed into cumulative_logprob); ``prompt_logprobs``: new
        prompt positions' (appended to the request's). Returns the requests that finished.
        """
        finished = []
        logprobs = logprobs or {}
        for request_id, entries in (prompt_logprobs or {}).items():
            request = self.requests.get(request_id)
            if request is not None:
                request.prompt_logprobs.extend(entries)
        now = time.monotonic()
        for s in out.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.is_finished:
                continue
            tokens = sampled.get(request.request_id)
            request.num_computed_tokens += s.num_new_tokens
            if s.num_spec:
                # Proposals after the first rejected one were computed for nothing: roll them back.
                num_rejected = s.num_spec - (len(tokens) - 1)
                request.num_computed_tokens -= num_rejected
                if num_rejected:
                    self.kv.truncate(request, request.num_computed_tokens + self.lookahead)
                request.spec_token_ids, request.spec_probs = [], None
            self.kv.cache_blocks(request)
            if tokens is None:
                continue
            lps = logprobs.get(request.request_id)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            for i, token in enumerate(tokens):
                if self.policy == "fair":
                    self._charge(request.user, _W_OUTPUT)
                request.output_token_ids.append(token)
                if lps is not None:
                    request.cumulative_logprob += lps[i].logprob
                grammar_done = False
                if request.grammar is not None:
                    # the mask allowed only tokens it accepts; a refusal is a dead end (finished, logged)
                    if not request.grammar.consume_token(token):
                        logger.warning(
                            "request %s: its grammar refused token %d; finished", request.request_id, token
                        )
                        grammar_done = True
                    else:
                        grammar_done = request.grammar.is_stopped()
                if request.request_id in self._forks:
                    self._fork(request)
                status = self._check_stop(request, token)
                if status is None and grammar_done:  # the format is complete (or cannot go on)
                    status = RequestStatus.FINISHED_STOPPED
                stop = on_token(request, i, token) if on_token is not None else None
                if stop is not None:
                    status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop
                if status is not None:
                    self.running.remove(request)
                    self._finish(request, status)
                    finished.append(request)
                    break
        return finished

    # ---- helpers ----------------------------------------------------------------------------------
    def _charge(self, user: str | None, service: float) -> None:
        self.user_counters[user] = self.user_counters.get(user, 0.0) + service

    def _scheduled(self, request: Request, num_new: int, out: SchedulerOutput) -> ScheduledRequest:
        rid = request.request_id
        start = request.num_computed_tokens
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.monotonic()
        # Proposals that do not fit the token budget are dropped; a partial set is still verified.
        num_spec = max(0, start + num_new - request.num_tokens)
        if num_spec < len(request.spec_token_ids):
            del request.spec_token_ids[num_spec:]
            if request.spec_probs is not None:
                request.spec_probs = request.spec_probs[:num_spec]
        if request.spec_probs is not None:
            out.spec_probs[rid] = request.spec_probs
        known = self._runner_outputs.get(rid)
        self._runner_outputs[rid] = request.num_output_tokens
        return ScheduledRequest(
            rid,
            start,
            num_new,
            self.kv.get_block_ids(rid),
            start + num_new >= request.num_tokens,
            list(request.spec_token_ids),
            output_start=request.num_output_tokens if known is None else known,
            new_token_ids=[] if known is None else request.output_token_ids[known:],
            new=NewRequestData.of(request) if known is None else None,
        )

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        request.spec_token_ids, request.spec_probs = [], None
        self._runner_outputs.pop(request.request_id, None)  # out.preempted_request_ids tells the runner
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)
        out.preempted_request_ids.append(request.request_id)

    def _fork(self, parent: Request) -> None:
        children = self._forks.pop(parent.request_id)
        # NOTE: the prompt's last token is recomputed by each sample (its logits are sampled), so only the
        # full blocks before it are shared.
        shared_tokens = (parent.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size
        for child in children:
            child.num_computed_tokens = self.kv.share_prefix(parent, child, shared_tokens)
            child.num_cached_tokens = parent.num_cached_tokens
        self.waiting.extend(children)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request.metrics.finished_time is None:
            request.metrics.finished_time = time.monotonic()
        if self._runner_outputs.pop(request.request_id, None) is not None:
            self._runner_dropped.append(request.request_id)
        self.kv.forget(request)
        del self.requests[request.request_id]
        self._active_per_user[request.user] -= 1
        for child in self._forks.pop(request.request_id, []):  # only on abort before the prompt finished
            self._finish(child, status)

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
