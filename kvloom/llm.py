"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import time
from typing import Any

from tqdm.auto import tqdm

from kvloom.engine import LLMEngine, Prompt
from kvloom.outputs import RequestOutput, RequestOutputKind
from kvloom.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Generate text offline with continuous batching.

    ``model`` is a Hugging Face folder or a .gguf file; None means the default SmolLM2-135M-Instruct.
    Other keyword arguments are EngineConfig fields (dtype, max_model_len, block_size, kv_cache_memory,
    num_kv_blocks, max_num_seqs, max_num_batched_tokens, seed, num_threads, device).
    """

    def __init__(self, model: str | None = None, show_progress: bool = True, **kwargs: Any) -> None:
        self.engine = LLMEngine.from_args(model, show_progress=show_progress, **kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (text, token ids, or lists of either) to completion; outputs in input order.

        ``priority`` (one per prompt, lower first) matters under ``scheduling_policy="priority"``.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts: expected a prompt or a non-empty list of prompts")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"priority: {len(priority)} given for {len(prompts)} prompts")
        request_ids = [f"gen-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, sp, prio in zip(request_ids, prompts, params, priority, strict=True):
                self.engine.add_request(
                    request_id, prompt, sp, priority=prio, output_kind=RequestOutputKind.FINAL_ONLY
                )
                added.append(request_id)
        except ValueError:
            # A bad prompt leaves no half-added batch: nothing has run yet, so aborting undoes the rest.
            self.engine.abort(added)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to conversations using the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self, conversation: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        text = tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        # NOTE: the template writes any BOS itself; tokenizing with special tokens would add a second one.
        return tok(text, add_special_tokens=False).input_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        engine = self.engine
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            # The bar counts requests; its postfix the tokens, as vLLM's does (prompt tokens computed and
            # tokens generated per second since the start).
            t0, prompt0, gen0 = time.perf_counter(), engine.num_prompt_tokens, engine.num_generation_tokens
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"requests {sorted(pending)} were aborted before they finished")
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(
                        f"input {(engine.num_prompt_tokens - prompt0) / dt:.0f} tok/s, "
                        f"output {(engine.num_generation_tokens - gen0) / dt:.0f} tok/s",
                        refresh=False,
                    )
        return [done[r] for r in request_ids]
