"""LLMEngine: add_request / step / abort. Owns the scheduler, the model runner and the detokenizers."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvloom.backends import start_build
from kvloom.config import EngineConfig
from kvloom.core.kv_cache_manager import KVCacheManager
from kvloom.core.scheduler import Scheduler
from kvloom.detokenizer import IncrementalDetokenizer
from kvloom.engine_args import create_engine_config
from kvloom.executor.executor import Executor
from kvloom.layers.kv_cache import kv_cache_density
from kvloom.logger import init_logger
from kvloom.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput, RequestOutputKind
from kvloom.request import Request, RequestStatus, TokenLogprobs
from kvloom.sampling_params import SamplingParams
from kvloom.spec.proposers import build_proposer
from kvloom.structured.backend import StructuredOutputs
from kvloom.worker.cpu_threads import ThreadGovernor

logger = init_logger(__name__)

Prompt = str | list[int]
_LOG_INTERVAL_S = 10.0


@dataclass
class _Group:
    """One user request: its samples (one, or n / best_of), their detokenizers and output logprobs."""

    request_id: str
    params: SamplingParams
    samples: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    logprobs: list[list[PositionLogprobs]]
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # DELTA: per sample, the characters and tokens already returned, and whether its end was returned
    sent: list[tuple[int, int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    emitted: bool = False  # an output was returned (DELTA returns prompt logprobs once)

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.samples)


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        t0 = time.perf_counter()
        # a first start builds the backend's kernels while the tokenizer is converted
        start_build(config.device.device, config.device.backend)
        # The tokenizer loads on a thread of its own while the weights load: a GGUF file's first start
        # converts it with transformers (2-3 s with the import), HF folders import transformers (1-2 s),
        # and the weight loading spends much of its time in numpy/torch with the GIL released.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvloom-tokenizer") as pool:
            tokenizer = pool.submit(config.checkpoint.load_tokenizer)
            self.executor = Executor.create(config, show_progress)
            self.runner = self.executor.runner
            self.tokenizer = tokenizer.result()
        self.kv_cache_manager = KVCacheManager(
            self.runner.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            self.runner.layout.windows,
        )
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            config.scheduler.max_num_batched_tokens,
            config.scheduler.max_num_seqs,
            config.model.max_model_len,
            config.scheduler.scheduling_policy,
            # a draft model writes K/V for its proposals past each request's tokens
            num_lookahead_tokens=config.speculative.num_speculative_tokens
            if config.speculative.speculative_method == "draft"
            else 0,
        )
        self.proposer = build_proposer(config, self.runner.vocab_size, self.runner.num_blocks, show_progress)
        self._groups: dict[str, _Group] = {}
        # Structured outputs: the grammars (llguidance, imported on first use) and the groups they constrain
        self.structured = StructuredOutputs(self.tokenizer, self.runner.vocab_size, config.eos_token_ids)
        self._constrained: set[str] = set()
        self._sample_group: dict[str, tuple[_Group, int]] = {}  # sample request id -> (group, index)
        self._token_text: dict[int, str] = {}
        # Monotonic counters for metrics: prompt tokens computed (recomputes included), tokens generated.
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._last_log = time.monotonic()
        # NOTE: fewer threads while other processes keep the CPUs busy (see kvloom/worker/cpu_threads.py).
        self.threads = (
            ThreadGovernor.create(config.device.device, config.parallel.num_threads)
            if config.parallel.tensor_parallel_size == 1
            else None  # ranks keep their share of the CPUs
        )
        # tokens the pool holds in all tables of a KV group (sliding-window tables then free most of theirs)
        num_tokens = self.runner.num_blocks * config.cache.block_size // self.runner.layout.num_groups
        logger.info(
            "Loaded %s (%s, %s, %s) in %.1fs; sampling seed %d; %d threads (%s)",
            config.checkpoint.path.name,
            config.model_type,
            str(config.dtype).removeprefix("torch."),
            config.device.device,
            time.perf_counter() - t0,
            config.model.seed,
            torch.get_num_threads(),
            "fixed" if self.threads is None else self.threads.describe(),
        )
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens of every layer (%.1f MiB, %s); max_model_len %d; "
            "largest batch: %d sequences (%d at full max_model_len); token budget %d per step",
            self.runner.num_blocks,
            config.cache.block_size,
            num_tokens,
            self.runner.kv_cache.numel() * self.runner.kv_cache.element_size() / 2**20,
            kv_cache_density(config),
            config.model.max_model_len,
            min(config.scheduler.max_num_seqs, self.runner.num_blocks),
            min(
                config.scheduler.max_num_seqs,
                self.runner.num_blocks
                // self.runner.layout.blocks_per_seq(
                    config.model.max_model_len,
                    config.cache.block_size,
                    config.scheduler.max_num_batched_tokens,
                ),
            ),
            config.scheduler.max_num_batched_tokens,
        )

    def is_fatal(self, error: BaseException) -> bool:
        """Whether a failed step leaves the engine unable to go on: with tensor parallel the ranks are no
        longer in step (a rank died, or its collectives failed)."""
        return self.config.parallel.tensor_parallel_size > 1

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at exit)."""
        self.executor.shutdown()

    @classmethod
    def from_args(cls, model: str | None = None, show_progress: bool = True, **kwargs: Any) -> LLMEngine:
        return cls(create_engine_config(model, **kwargs), show_progress)

    # ---- requests -----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Validate a prompt (text or token ids) and return (text, token ids); raises ValueError."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty prompt")
            text, ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
            self._check_token_ids("prompt", ids)
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: empty prompt")
        if len(ids) >= self.config.model.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                f"{self.config.model.max_model_len}"
            )
        return text, ids

    def _check_token_ids(self, field: str, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            vocab = self.runner.vocab_size
            raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        user: str | None = None,
        cache_salt: str | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        """Queue a request. Raises ValueError on bad input, leaving the engine untouched.

        ``priority``: lower values are served first under the "priority" policy. ``user``: the party whose
        share the "fair" policy balances. ``cache_salt``: requests with different salts never share
        prefix-cache blocks. ``output_kind``: what ``step()`` returns of this request (RequestOutputKind):
        everything so far after each step, only what is new (what a stream sends), or one output at the end
        (what ``LLM.generate`` reads). The last two save copying each request's tokens and text each step.
        """
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize_prompt(prompt)
        self._check_token_ids("logit_bias", list(params.logit_bias or {}))
        self._check_token_ids("stop_token_ids", params.stop_token_ids)
        if params.num_samples > self.config.scheduler.max_num_seqs:
            # NOTE: checked before any sample exists: n = 2^63 once allocated until the OS killed the server.
            field = "best_of" if params.best_of is not None else "n"
            raise ValueError(
                f"{field}: {params.num_samples} samples exceed max_num_seqs "
                f"({self.config.scheduler.max_num_seqs}), the most sequences one batch holds"
            )
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        matchers = []
        if params.structured_outputs is not None:  # a bad format is a ValueError here, before queueing
            matchers = [self.structured.matcher(params.structured_outputs) for _ in range(params.num_samples)]
        k = params.num_samples
        # NOTE: samples of one request get internal ids; the user's id names the group.
        sample_ids = [request_id] if k == 1 else [f"{request_id}\x00{i}" for i in range(k)]
        samples = [
            Request(
                sid,
                ids,
                params,
                eos_token_ids=self.config.eos_token_ids,
                prompt=text,
                index=i,
                priority=priority,
                user=user,
                cache_salt=cache_salt,
            )
            for i, sid in enumerate(sample_ids)
        ]
        if matchers:
            for r, m in zip(samples, matchers, strict=True):
                r.grammar = m
            self._constrained.add(request_id)
        self.scheduler.add_request(samples[0], forks=samples[1:])
        group = _Group(
            request_id,
            params,
            samples,
            [
                IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    params.skip_special_tokens,
                    params.stop,
                    params.include_stop_str_in_output,
                )
                for _ in samples
            ],
            [[] for _ in samples],
            output_kind,
            [(0, 0)] * k,
            [False] * k,
        )
        self._groups[request_id] = group
        for i, r in enumerate(samples):
            self._sample_group[r.request_id] = (group, i)

    def warm_up(self, num_requests: int = 4, prompt_len: int = 192, max_tokens: int = 8) -> float:
        """Run a few throwaway requests (prefill, then batched decode steps) before serving, so that the
        first real requests do not pay first-use costs: fresh memory's page faults, allocator and thread
        pool start-up. (Measured: the first 60 requests after a cold `kvloom serve` had p99 TTFT 1.2 s;
        a second run 0.2 s.) vLLM warms up at start-up too. The token and prefix-cache counters are reset
        afterwards. Returns the seconds it took."""
        t0 = time.perf_counter()
        prompt_len = max(1, min(prompt_len, self.config.model.max_model_len - max_tokens - 1))
        vocab = self.config.hf_config.vocab_size
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        for i in range(num_requests):
            ids = [(100 + 7 * i + j) % vocab for j in range(prompt_len)]
            self.add_request(f"__warm_up_{i}", ids, params)
        while self.has_unfinished_requests():
            self.step()
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.kv_cache_manager.num_queried_tokens = self.kv_cache_manager.num_hit_tokens = 0
        if self.proposer is not None:
            self.proposer.reset_stats()
        return time.perf_counter() - t0

    def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); their KV blocks are freed at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            group = self._groups.get(request_id)
            if group is None:
                continue
            self.scheduler.finish_requests(
                [r.request_id for r in group.samples], RequestStatus.FINISHED_ABORTED
            )
            self._drop(group)
        if self.proposer is not None:
            self.proposer.forget(self.scheduler.requests)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one iteration ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return outputs of requests that got new tokens."""
        if self.threads is not None:
            self.threads.step()
        proposals = None
        if self.proposer is not None:
            proposals = self.proposer.propose(self.scheduler.running, self.kv_cache_manager.get_block_ids)
        out = self.scheduler.schedule(proposals)
        if out.is_empty:
            return []
        if self._constrained:
            out.grammar = self.structured.bitmask(out, self.scheduler.requests)
        t_exec = time.perf_counter()
        result = self.runner.execute(out)
        t_exec = time.perf_counter() - t_exec
        requests = self.scheduler.requests
        self.num_prompt_tokens += sum(
            max(0, min(s.start + s.num_new_tokens, requests[s.request_id].num_prompt_tokens) - s.start)
            for s in out.scheduled
        )
        if self.proposer is not None:
            self.proposer.record(out, result, t_exec)

        touched: dict[str, _Group] = {}

        def on_token(request: Request, j: int, token: int) -> str | None:
            """The j-th new token of a request is appended: text, stop strings, logprobs."""
            group, i = self._sample_group[request.request_id]
            self.num_generation_tokens += 1
            touched[group.request_id] = group
            detok = group.detokenizers[i]
            detok.add_token(token)
            lps = result.logprobs.get(request.request_id)
            if lps is not None and group.params.logprobs is not None:
                group.logprobs[i].append(self._position_logprobs(lps[j]))
            # NOTE: stop strings count only once min_tokens are out (this token included).
            return detok.find_stop(active=request.num_output_tokens > group.params.min_tokens)

        self.scheduler.update_from_output(
            out, result.sampled, on_token, result.logprobs, result.prompt_logprobs
        )
        if self.proposer is not None:
            self.proposer.forget(self.scheduler.requests)
        if time.monotonic() - self._last_log > _LOG_INTERVAL_S:
            self._last_log = time.monotonic()
            logger.info(self.stats_line())

        outputs = []
        for group in touched.values():
            if group.kind is RequestOutputKind.FINAL_ONLY and not group.finished:
                continue
            output = self._output(group)
            if output is not None:
                outputs.append(output)
            if group.finished:
                self._drop(group)
        return outputs

    def stats_line(self) -> str:
        kv = self.kv_cache_manager
        hit_rate = kv.num_hit_tokens / kv.num_queried_tokens if kv.num_queried_tokens else 0.0
        line = (
            f"running {self.scheduler.num_running}, waiting {self.scheduler.num_waiting}, "
            f"KV usage {kv.usage:.1%}, prefix cache hit rate {hit_rate:.1%} "
            f"({kv.num_hit_tokens}/{kv.num_queried_tokens} prompt tokens), "
            f"preemptions {self.scheduler.num_preemptions}, generated {self.num_generation_tokens} tokens"
        )
        if self.proposer is not None:
            st = self.proposer.stats
            line += (
                f", speculation: {st.num_accepted_tokens}/{st.num_draft_tokens} proposed tokens accepted "
                f"({st.acceptance_rate:.1%}) in {st.num_drafts} verifications"
            )
        return line

    # ---- outputs ------------------------------------------------------------------------------------
    def _drop(self, group: _Group) -> None:
        del self._groups[group.request_id]
        self._constrained.discard(group.request_id)
        for r in group.samples:
            del self._sample_group[r.request_id]

    def _decoded(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        entry = {t: Logprob(v, rank + 1, self._decoded(t)) for rank, (t, v) in enumerate(lp.top)}
        if lp.token_id not in entry:
            entry[lp.token_id] = Logprob(lp.logprob, lp.rank, self._decoded(lp.token_id))
        return entry

    def _output(self, group: _Group) -> RequestOutput | None:
        params = group.params
        finished = group.finished
        ranked = params.num_samples > params.n
        if ranked and not finished:
            return None  # best_of: the n best are known only at the end
        delta = group.kind is RequestOutputKind.DELTA
        completions = []
        for i, (r, detok) in enumerate(zip(group.samples, group.detokenizers, strict=True)):
            text, ids, logprobs = detok.output_text(r.is_finished), r.output_token_ids, group.logprobs[i]
            chars, tokens = group.sent[i] if delta else (0, 0)
            if delta:
                if group.ended[i] or (len(text) == chars and len(ids) == tokens and not r.is_finished):
                    continue  # nothing new for this sample
                group.sent[i], group.ended[i] = (len(text), len(ids)), r.is_finished
            completions.append(
                CompletionOutput(
                    index=r.index,
                    text=text[chars:],
                    token_ids=ids[tokens:],
                    cumulative_logprob=r.cumulative_logprob if params.needs_sampled_logprob else None,
                    logprobs=logprobs[tokens:] if params.logprobs is not None else None,
                    finish_reason=r.status.finish_reason,
                    stop_reason=r.stop_reason,
                    num_tokens=len(ids),
                )
            )
        if not completions:
            return None
        if ranked:
            completions = sorted(completions, key=lambda c: -c.cumulative_logprob)[: params.n]
            for i, c in enumerate(completions):
                c.index = i
        first = group.samples[0]
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not (delta and group.emitted):
            prompt_logprobs = [None] + [self._position_logprobs(lp) for lp in first.prompt_logprobs]
        group.emitted = True
        return RequestOutput(
            group.request_id,
            first.prompt,
            first.prompt_token_ids,
            completions,
            finished,
            prompt_logprobs,
            first.metrics,
            first.num_cached_tokens or 0,
        )
