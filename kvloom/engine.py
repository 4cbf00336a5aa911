"""LLMEngine: add_request / step / abort. Owns the scheduler, the model runner and the detokenizers."""

from __future__ import annotations

import time
from typing import Any

from kvloom.config import EngineConfig
from kvloom.core.kv_cache_manager import KVCacheManager
from kvloom.core.scheduler import Scheduler
from kvloom.detokenizer import IncrementalDetokenizer
from kvloom.logger import init_logger
from kvloom.outputs import CompletionOutput, RequestOutput
from kvloom.request import Request, RequestStatus
from kvloom.sampling_params import SamplingParams
from kvloom.worker.model_runner import ModelRunner

logger = init_logger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.tokenizer = config.checkpoint.load_tokenizer()
        self.runner = ModelRunner(config, show_progress)
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.kv_cache_manager, config.max_num_batched_tokens, config.max_num_seqs, config.max_model_len
        )
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        num_tokens = self.runner.num_blocks * config.block_size
        logger.info(
            "Loaded %s (%s, %s, %s) in %.1fs",
            config.checkpoint.path.name,
            config.model_type,
            str(config.dtype).removeprefix("torch."),
            config.device,
            time.perf_counter() - t0,
        )
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB); max_model_len %d; "
            "largest batch: %d sequences (%d at full max_model_len); token budget %d per step",
            self.runner.num_blocks,
            config.block_size,
            num_tokens,
            self.runner.kv_cache.numel() * self.runner.kv_cache.element_size() / 2**20,
            config.max_model_len,
            min(config.max_num_seqs, self.runner.num_blocks),
            min(config.max_num_seqs, num_tokens // config.max_model_len),
            config.max_num_batched_tokens,
        )

    @classmethod
    def from_args(cls, model: str | None = None, show_progress: bool = True, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.create(model, **kwargs), show_progress)

    # ---- requests -----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """Validate a prompt (text or token ids) and return (text, token ids); raises ValueError."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty prompt")
            text, ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
            bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.runner.vocab_size})"
                )
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: empty prompt")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                f"{self.config.max_model_len}"
            )
        return text, ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError on bad input, leaving the engine untouched."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize_prompt(prompt)
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, ids, params, eos_token_ids=self.config.eos_token_ids, prompt=text)
        self.scheduler.add_request(request)
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, ids, params.skip_special_tokens
        )

    def abort(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request in self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED):
            request.metrics.finished_time = time.monotonic()
            self._detokenizers.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one iteration ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return outputs of requests that got a new token."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        now = time.monotonic()
        for s in out.scheduled:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        sampled = self.runner.execute(out)
        self.scheduler.update_from_output(out, sampled)
        now = time.monotonic()
        outputs = []
        for s in out.scheduled:
            request = s.request
            token = sampled.get(request.request_id)
            if token is None:
                continue
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            detok = self._detokenizers[request.request_id]
            detok.add_token(token)
            if request.is_finished:
                request.metrics.finished_time = now
                del self._detokenizers[request.request_id]
            outputs.append(self._output(request, detok.text))
        return outputs

    def _output(self, request: Request, text: str) -> RequestOutput:
        completion = CompletionOutput(0, text, list(request.output_token_ids), request.status.finish_reason)
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            [completion],
            request.is_finished,
            request.metrics,
        )
