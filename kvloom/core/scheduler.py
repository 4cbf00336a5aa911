"""The scheduler: one rule, iteration-level continuous batching under a token budget.

Each step, every scheduled request gets tokens so that ``num_computed_tokens`` catches up with
``num_tokens``: running requests first (a decode needs one token, an unfinished prefill a chunk), then
waiting ones, in arrival order. Chunked prefill, prefill/decode mixing and recompute after preemption
all fall out of this rule; there is no prefill phase and no decode phase.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvloom.core.kv_cache_manager import KVCacheManager
from kvloom.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # == request.num_computed_tokens when scheduled
    num_new_tokens: int
    block_ids: list[int]
    # Whether this step reaches the end of the request's tokens, so its last logits are sampled.
    samples: bool


@dataclass
class SchedulerOutput:
    """The contract between scheduler and model runner for one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

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
    ) -> None:
        self.kv = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # parent request id -> samples that fork from it once its prompt is computed (n / best_of > 1)
        self._forks: dict[str, list[Request]] = {}
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------
    def add_request(self, request: Request, forks: list[Request] | None = None) -> None:
        """Queue a request. ``forks`` are further samples of the same prompt: they wait until the prompt is
        computed once, then share its full KV blocks by reference count and continue on their own."""
        for r in [request, *(forks or [])]:
            if r.request_id in self.requests:
                raise ValueError(f"request_id {r.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if forks:
            self._forks[request.request_id] = list(forks)
            for f in forks:
                self.requests[f.request_id] = f

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

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            # NOTE: keep one token of budget for every running request after this one, so a long
            # prefill chunk can never starve the decodes behind it.
            reserve = len(self.running) - i - 1
            num_new = min(request.num_tokens - request.num_computed_tokens, max(1, budget - reserve))
            while not self.kv.allocate_slots(request, num_new):
                # Out of blocks: preempt the newest running request (possibly this one) by recompute.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                i += 1

        # Waiting requests are admitted only when nothing was preempted, so a preempted request is not
        # immediately displaced by a newer one.
        while (
            not out.preempted_request_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return out

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, int], stop_strings: dict[str, str] | None = None
    ) -> list[Request]:
        """Advance computed tokens, append sampled tokens, fork samples, finish requests.

        ``stop_strings``: requests whose text now contains a stop string (found by the detokenizer).
        Returns the requests that finished.
        """
        finished = []
        for s in out.scheduled:
            request = s.request
            if request.is_finished:
                continue
            request.num_computed_tokens += s.num_new_tokens
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            if request.request_id in self._forks:
                self._fork(request)
            status = self._check_stop(request, token)
            if stop_strings and request.request_id in stop_strings:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop_strings[request.request_id]
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
                finished.append(request)
        return finished

    # ---- helpers ----------------------------------------------------------------------------------
    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request,
            start,
            num_new,
            self.kv.get_block_ids(request.request_id),
            start + num_new == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fork(self, parent: Request) -> None:
        children = self._forks.pop(parent.request_id)
        # NOTE: the prompt's last token is recomputed by each sample (its logits are sampled), so only the
        # full blocks before it are shared.
        shared_tokens = (parent.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size
        for child in children:
            child.num_computed_tokens = self.kv.share_prefix(parent, child, shared_tokens)
        self.waiting.extendleft(reversed(children))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
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
