"""Proposers for speculative decoding, and how many tokens each request speculates.

Before every step the engine asks the proposer for tokens that follow each decoding request (``propose``
returns them by request id); the scheduler schedules them as extra tokens of the request and the model
runner verifies them (kvloom/spec/verify.py). Proposers read requests, never write them. Two proposers:

- ``ngram`` (prompt lookup): the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
  looked up in the request's own prompt and output; the tokens that followed their latest earlier
  occurrence are proposed. Free to compute; strong when the output copies its input (edits, summaries,
  code refactoring).
- ``draft``: a smaller model with the same vocabulary (a separate checkpoint, or the target itself with
  int4 weights) runs k single-token passes per engine step on a KV pool of its own with the target's
  block tables: the scheduler allocates k lookahead slots past every running request's tokens for it
  (``num_lookahead_tokens``), as vLLM does for its drafts. The draft pool keeps what it computed for
  tokens the target accepted, so each step only catches up on the new ones.

How many tokens to propose is decided per request from its recent acceptance rate a (a new request starts
from the rate over all requests) and the measured cost of a proposal: k maximizes the expected tokens per
step, (1 - a^(k+1)) / (1 - a), divided by the cost of the step, 1 + k (c_draft + c_row) (c_draft: one
draft pass relative to a target step; c_row: one more verified row; both measured, as medians of recent
steps). When no k > 0 is expected to gain at least 5%, the request does not speculate, and probes with two
tokens after 8 steps, then 16, ..., 128 while the probes show no gain, to notice when it would.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvloom.config import EngineConfig
from kvloom.core.scheduler import NewRequestData, ScheduledRequest, SchedulerOutput
from kvloom.engine_args import create_engine_config
from kvloom.logger import init_logger
from kvloom.request import Request, RequestStatus
from kvloom.sampling_params import SamplingParams
from kvloom.structured.backend import matcher_bitmask

if TYPE_CHECKING:
    from kvloom.worker.model_runner import ModelRunnerOutput

logger = init_logger(__name__)

_DECAY = 0.8  # weight of the older acceptance observations per verification
_DECAY_ALL = 0.98  # the same for the rate over all requests (a new request's prior)
_ROW_COST = 0.05  # one more verified row, as a fraction of a decode step, until it is measured
# Paused requests probe with two tokens after 8 steps, then 16, ... 128 while probes show no gain (each
# probe first catches the draft up on the tokens since the last one).
_FIRST_PAUSE, _MAX_PAUSE = 8, 128
_MIN_GAIN = 0.05  # speculate only where the expected speed-up is at least this (estimates are rough)


@dataclasses.dataclass
class SpecStats:
    """Counters since start: verification steps with proposals, tokens proposed and accepted, and both by
    position (index j: proposal j + 1 of a step)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    proposed_per_position: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def empty(cls, k: int) -> SpecStats:
        return cls(accepted_per_position=[0] * k, proposed_per_position=[0] * k)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def summary(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_per_draft": self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0,
            # of the proposals made at each position, the fraction accepted
            "acceptance_per_position": [
                a / p if p else 0.0
                for a, p in zip(self.accepted_per_position, self.proposed_per_position, strict=True)
            ],
        }


def expected_tokens(rate: float, k: int) -> float:
    """Tokens per verification step when each proposal is accepted with probability ``rate``."""
    return float(k + 1) if rate >= 1.0 else (1.0 - rate ** (k + 1)) / (1.0 - rate)


class Proposer:
    """Chooses k per request and returns its proposals; subclasses say what the tokens are."""

    _pass_time = 0.0  # one proposal pass, seconds (median of recent ones; 0 for free proposals)

    def __init__(self, num_speculative_tokens: int, max_model_len: int, adaptive: bool = True) -> None:
        self.k = num_speculative_tokens
        self.max_model_len = max_model_len
        self.adaptive = adaptive
        self.stats = SpecStats.empty(num_speculative_tokens)
        self._accepted: dict[str, tuple[float, float]] = {}  # request id -> decayed (accepted, trials)
        self._all = (0.0, 0.0)  # the same over all requests
        # request id -> (steps paused, pause before the next probe): pauses double while probes fail
        self._paused: dict[str, tuple[int, int]] = {}
        self.step_cost = StepCost()

    def reset_stats(self) -> None:
        """Forget the counters and the acceptance over all requests (after a warm-up); the measured
        costs stay."""
        self.stats = SpecStats.empty(self.k)
        self._all = (0.0, 0.0)

    @property
    def draft_cost(self) -> float:
        """One proposal pass as a fraction of a target decode step."""
        base = self.step_cost.base()
        return self._pass_time / base if base else 0.0

    def proposal_cost(self) -> float:
        """One more proposed token, as a fraction of a target decode step: a draft pass plus a verified
        row."""
        return self.draft_cost + self.step_cost.row_cost()

    def num_tokens_for(self, request: Request, cost: float | None = None) -> int:
        """How many tokens to propose for a decoding request (0: not this step). ``cost``: this step's
        ``proposal_cost()``, computed once for all requests (medians over recent steps)."""
        params = request.sampling_params
        # Never propose past max_tokens (the step emits up to k + 1) or past max_model_len.
        limit = min(
            self.k,
            params.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if limit <= 0 or not self.adaptive:
            return max(limit, 0)
        accepted, trials = self._accepted.get(request.request_id, (0.0, 0.0))
        # The prior: two observations at the rate of all requests so far (a new request starts from it).
        ga, gt = self._all
        rate = (accepted + 2.0 * (ga + 1.0) / (gt + 2.0)) / (trials + 2.0)
        if cost is None:
            cost = self.proposal_cost()
        gain = [expected_tokens(rate, k) / (1.0 + k * cost) for k in range(limit + 1)]
        best = max(range(limit + 1), key=gain.__getitem__)
        rid = request.request_id
        if gain[best] >= 1.0 + _MIN_GAIN:
            self._paused.pop(rid, None)
            return best
        idle, pause = self._paused.get(rid, (0, _FIRST_PAUSE))
        if idle + 1 < pause:
            self._paused[rid] = (idle + 1, pause)
            return 0
        # Probe with two tokens: the second pass is the one that measures the draft's cost.
        self._paused[rid] = (0, min(2 * pause, _MAX_PAUSE))
        return min(2, limit)

    def propose(
        self, running: list[Request], block_ids: Callable[[str], list[int]]
    ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Proposals for the running requests that are decoding (one uncomputed token): request id ->
        (tokens, the distributions they were drawn from, or None for point masses). ``block_ids``: a
        request's KV blocks (the scheduler's; the draft model writes its own pool at the same blocks)."""
        wanted = []
        cost = self.proposal_cost() if self.adaptive else 0.0
        for r in running:
            if r.status == RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens - 1:
                k = self.num_tokens_for(r, cost)
                if k > 0:
                    wanted.append((r, k))
        return self._propose(wanted, block_ids) if wanted else {}

    def _propose(
        self, wanted: list[tuple[Request, int]], block_ids: Callable[[str], list[int]]
    ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        raise NotImplementedError

    def record(self, out: SchedulerOutput, result: ModelRunnerOutput, step_time: float) -> None:
        """Count a step's verifications and update each request's acceptance rate."""
        for s in out.scheduled:
            if not s.num_spec:
                continue
            rid = s.request_id
            a = result.num_accepted[rid]
            st = self.stats
            st.num_drafts += 1
            st.num_draft_tokens += s.num_spec
            st.num_accepted_tokens += a
            for j in range(s.num_spec):
                st.proposed_per_position[j] += 1
                st.accepted_per_position[j] += j < a
            accepted, trials = self._accepted.get(rid, (0.0, 0.0))
            n = a + (1 if a < s.num_spec else 0)  # proposals judged: the accepted ones and the first rejected
            self._accepted[rid] = (_DECAY * accepted + a, _DECAY * trials + n)
            self._all = (_DECAY_ALL * self._all[0] + a, _DECAY_ALL * self._all[1] + n)
        # Steps of decodes and verifications only: prefill steps say nothing about a verified row.
        if out.scheduled and all(s.num_new_tokens == 1 + s.num_spec for s in out.scheduled):
            self.step_cost.add(out.num_scheduled_tokens / len(out.scheduled), step_time)

    def forget(self, live: Collection[str]) -> None:
        """Drop the state of finished requests (``live``: the ids of those not finished)."""
        for d in (self._accepted, self._paused):
            for rid in [r for r in d if r not in live]:
                del d[rid]


class StepCost:
    """The target's step time against x, the rows per request (1 + proposals), over recent decode steps:
    medians, so the odd slow step (page faults, a collection) does not move it."""

    def __init__(self, window: int = 64) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)

    def add(self, x: float, y: float) -> None:
        self.samples.append((x, y))

    def base(self) -> float:
        """Seconds of a step with one row per request (before such steps are seen: the default row cost
        taken out of the others)."""
        plain = [y for x, y in self.samples if x == 1]
        if len(plain) >= 3:
            return statistics.median(plain)
        if not self.samples:
            return 0.0
        return statistics.median(y / (1 + _ROW_COST * (x - 1)) for x, y in self.samples)

    def row_cost(self) -> float:
        """One more row per request, as a fraction of base()."""
        plain = sum(1 for x, _ in self.samples if x == 1)
        extra = [(x, y) for x, y in self.samples if x > 1]
        if plain < 3 or len(extra) < 3:
            return _ROW_COST
        base = self.base()
        return min(max(statistics.median((y / base - 1) / (x - 1) for x, y in extra), 0.0), 1.0)


class NgramProposer(Proposer):
    def __init__(
        self, num_speculative_tokens: int, max_model_len: int, min_n: int, max_n: int, adaptive: bool = True
    ) -> None:
        super().__init__(num_speculative_tokens, max_model_len, adaptive)
        self.min_n, self.max_n = min_n, max_n  # 1 <= min_n <= max_n: create_engine_config checks it

    def _propose(
        self, wanted: list[tuple[Request, int]], block_ids: Callable[[str], list[int]]
    ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        out = {}
        for r, k in wanted:
            tokens = np.asarray(r.prompt_token_ids + r.output_token_ids, dtype=np.int64)
            out[r.request_id] = (ngram_lookup(tokens, k, self.min_n, self.max_n), None)
        return out


def ngram_lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix (max_n down to
    min_n tokens) found earlier in ``tokens``; [] when none is."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        # Windows starting at 0 .. length - n - 1: every earlier occurrence (the suffix itself excluded).
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class DraftProposer(Proposer):
    """A draft model on its own ModelRunner, whose KV pool has the target's blocks (same count and size):
    each request's draft K/V lie at the target's block ids, in slots the scheduler allocated (k
    lookahead slots past each running request's tokens). The draft's runner is fed plain
    SchedulerOutputs like the target's, built here from the target's requests."""

    def __init__(
        self, draft_config: EngineConfig, num_speculative_tokens: int, adaptive: bool, show_progress: bool
    ) -> None:
        from kvloom.worker.model_runner import ModelRunner

        super().__init__(num_speculative_tokens, draft_config.model.max_model_len, adaptive)
        self.config = draft_config
        self.runner = ModelRunner(draft_config, show_progress)
        # request id -> (its preemption count, positions whose draft K/V are in the pool, target output
        # tokens the draft's runner holds)
        self.computed: dict[str, tuple[int, int, int]] = {}
        # Pass times (median: robust to the odd slow pass, such as the first one, which faults in the weights)
        self._recent_passes: collections.deque[float] = collections.deque(maxlen=15)

    def forget(self, live: Collection[str]) -> None:
        """Also drop the draft runner's state of finished requests."""
        super().forget(live)
        for rid in [rid for rid in self.computed if rid not in live]:
            del self.computed[rid]
            self.runner.requests.pop(rid, None)

    def _propose(
        self, wanted: list[tuple[Request, int]], block_ids: Callable[[str], list[int]]
    ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        # (request, k, proposals, their distributions), filled pass by pass
        active: list[tuple[Request, int, list[int], list[torch.Tensor]]] = []
        first_pass: dict[str, ScheduledRequest] = {}
        for r, k in wanted:
            rid = r.request_id
            preemptions = r.metrics.num_preemptions
            known = self.computed.get(rid)
            if known is None or known[0] != preemptions:  # new, or its blocks were freed since
                start, new = 0, NewRequestData.of(r)
                new.sampling_params = _draft_params(r.sampling_params)
                held = r.num_output_tokens
            else:
                # the draft K/V of tokens the target has since accepted stay; its rejected proposals
                # after them are computed again
                start, new, held = min(known[1], r.num_computed_tokens), None, known[2]
            first_pass[rid] = ScheduledRequest(
                rid,
                start,
                r.num_tokens - start,
                block_ids(rid),
                True,
                output_start=held,
                new_token_ids=[] if new is not None else r.output_token_ids[held:],
                new=new,
            )
            self.computed[rid] = (preemptions, start, r.num_output_tokens)
            active.append((r, k, [], []))
        proposals = list(active)
        # Structured outputs: the draft proposes within the request's format, on a copy of its matcher
        # (proposals outside it would only be rejected)
        matchers = {r.request_id: r.grammar.deep_copy() for r, _ in wanted if r.grammar is not None}
        while active:
            out = SchedulerOutput()
            for r, _, tokens, _ in active:
                rid = r.request_id
                if not tokens:
                    out.scheduled.append(first_pass[rid])
                else:  # one more token: the last proposal
                    pos = r.num_tokens + len(tokens) - 1
                    out.scheduled.append(
                        ScheduledRequest(
                            rid,
                            pos,
                            1,
                            block_ids(rid),
                            True,
                            output_start=r.num_output_tokens + len(tokens) - 1,
                            new_token_ids=tokens[-1:],
                        )
                    )
            live = {r.request_id: matchers[r.request_id] for r, _, _, _ in active if r.request_id in matchers}
            if live:
                out.grammar = matcher_bitmask(live, self.runner.vocab_size)
            t0 = time.perf_counter()
            result = self.runner.execute(out, keep_probs=True)
            # NOTE: a pass that catches up on more than the two tokens of steady speculation (the whole
            # prompt the first time, or the tokens of a pause) is not timed as a proposal pass.
            if max(s.num_new_tokens for s in out.scheduled) <= 2:
                self._recent_passes.append(time.perf_counter() - t0)
            still = []
            for r, k, tokens, probs in active:
                rid = r.request_id
                token = result.sampled[rid][0]
                tokens.append(token)
                if rid in result.probs:  # sampled (temperature > 0): the rejection rule needs q
                    probs.append(result.probs[rid])
                # draft K/V now stand for every position before the new proposal
                preemptions, _, held = self.computed[rid]
                self.computed[rid] = (preemptions, r.num_tokens + len(tokens) - 1, held)
                m = matchers.get(rid)
                if m is not None and (not m.try_consume_tokens([token]) or m.is_stopped()):
                    continue  # the format ends here (or refuses it): no proposals after this one
                if len(tokens) < k:
                    still.append((r, k, tokens, probs))
            active = still
        if self._recent_passes:
            self._pass_time = statistics.median(self._recent_passes)
        return {
            r.request_id: (tokens, torch.stack(probs) if probs else None) for r, _, tokens, probs in proposals
        }


def _draft_params(params: SamplingParams) -> SamplingParams:
    """The request's sampling rule for the draft, without the outputs only the target reports. A seeded
    request's draft draws use a seed of their own, so they are independent of the target's."""
    seed = None if params.seed is None else hash((params.seed, "draft")) & ((1 << 63) - 1)
    return dataclasses.replace(params, n=1, best_of=None, logprobs=None, prompt_logprobs=None, seed=seed)


def build_proposer(
    config: EngineConfig, vocab_size: int, num_blocks: int, show_progress: bool = True
) -> Proposer | None:
    """The proposer the config asks for (None without speculation). ``num_blocks``: the target's KV pool
    (the draft's pool has as many blocks, addressed by the target's block tables)."""
    method = config.speculative.speculative_method
    if method is None:
        return None
    if method == "ngram":
        return NgramProposer(
            config.speculative.num_speculative_tokens,
            config.model.max_model_len,
            config.speculative.prompt_lookup_min,
            config.speculative.prompt_lookup_max,
            config.speculative.adaptive_speculation,
        )
    # The draft: the target's options, its own checkpoint and weights, a pool of the target's blocks.
    options = {
        k: v for g in ("model", "cache", "scheduler", "device") for k, v in vars(getattr(config, g)).items()
    }
    options.update(
        model=config.speculative.speculative_model or str(config.checkpoint.path),
        dtype=config.dtype,
        quantization=config.speculative.speculative_quantization,
        num_kv_blocks=num_blocks,
    )
    draft_config = create_engine_config(**options)
    proposer = DraftProposer(
        draft_config,
        config.speculative.num_speculative_tokens,
        config.speculative.adaptive_speculation,
        show_progress,
    )
    if proposer.runner.vocab_size != vocab_size:
        raise ValueError(
            f"speculative_model: the draft's vocabulary has {proposer.runner.vocab_size} tokens, the "
            f"target's {vocab_size}; a draft must share the target's tokenizer"
        )
    return proposer
