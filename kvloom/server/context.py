"""What every endpoint family shares: the engine, the handlers' tokenizer and its thread, the chat
template, and the checks and steps that come before any request runs."""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request

from kvloom.async_engine import AsyncEngine, RequestStream
from kvloom.outputs import RequestOutputKind
from kvloom.sampling_params import SamplingParams
from kvloom.server import tools
from kvloom.server.protocol import OpenAIError
from kvloom.tokenizer import FastTokenizer


def _longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the longest vocabulary entry as written (an upper bound on the text one token
    stands for: byte-level and sentencepiece markers take more bytes than the byte or space they mean)."""
    vocab = tokenizer._backend.get_vocab() if isinstance(tokenizer, FastTokenizer) else tokenizer.get_vocab()
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=64)


def value_error(e: ValueError) -> OpenAIError:
    """Engine and SamplingParams errors name the field first ("temperature must be ...", "prompt: ...")."""
    m = re.match(r"^(\w+)", str(e))
    return OpenAIError(str(e), param=m.group(1) if m else None)


class ServerContext:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        chat_template: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        """``chat_template``: a template in place of the model's; ``tool_call_parser``: how tool calls are
        read from the output under tool_choice "auto" (default: what the template's format calls for)."""
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.engine.config.model.max_model_len
        # NOTE: the engine thread owns its tokenizer; handlers use their own copy (fast tokenizers must not
        # be used from two threads at once), on one thread of its own: a 7 MiB prompt took ~4 s to
        # tokenize, which on the event loop stalled /health and every stream. The tokenizers library lets
        # go of the GIL while it encodes.
        self.tokenizer = tokenizer = copy.deepcopy(engine.tokenizer)
        if isinstance(tokenizer, FastTokenizer) and tokenizer.chat_template:
            tokenizer.hf  # noqa: B018 - build the chat template's transformers tokenizer now, not in a request
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvloom-tokenizer")
        # A text longer than this in UTF-8 cannot fit in the context (each token stands for at most the
        # longest vocabulary entry's bytes; x4 for normalizers that shrink text): refused before
        # tokenizing, so a multi-MiB prompt costs no seconds of CPU beside the engine's threads.
        self.max_text_bytes = 4 * _longest_token_bytes(tokenizer) * self.max_model_len
        self.custom_template = chat_template
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.parser = tool_call_parser or tools.pick_parser(self.template)

    def check_length(self, text: str, field: str) -> None:
        if len(text) * 4 <= self.max_text_bytes:  # at most 4 bytes a character: short enough, no encoding
            return
        size = len(text.encode("utf-8"))
        if size > self.max_text_bytes:
            raise OpenAIError(
                f"{field}: {size} bytes of text are more tokens than this model's maximum context length "
                f"({self.max_model_len} tokens)",
                param=field,
            )

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the handlers' tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)

    async def check_format(self, req: Any) -> None:
        """An invalid schema, regex or grammar is a 400 naming its field before anything runs (built
        off the loop and cached: the engine's copy for the request is then cheap)."""
        params, field = req.structured()
        if params is None:
            return
        try:
            await self.off_loop(self.engine.engine.structured.matcher, params, field)
        except ValueError as e:
            raise OpenAIError(str(e), param=field) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def max_tokens_for(self, prompt_len: int, requested: int | None, field: str) -> int:
        if requested is not None and requested < 1:
            raise OpenAIError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        max_model_len = self.max_model_len
        room = max_model_len - prompt_len
        if room < 1:
            verb = "has" if field == "prompt" else "have"
            raise OpenAIError(
                f"This model's maximum context length is {max_model_len} tokens. However, the {field} "
                f"{verb} {prompt_len} tokens, which leaves no room for the completion.",
                param=field,
            )
        if requested is None:
            requested = room
        if prompt_len + requested > max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the {field}, {requested} for the "
                f"completion). Lower max_tokens to at most {room}.",
                param="max_tokens",
            )
        return requested

    async def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise OpenAIError("prompt must not be empty", param="prompt")
            self.check_length(prompt, "prompt")
            return await self.off_loop(lambda: self.tokenizer(prompt).input_ids)
        return list(prompt)

    async def chat_ids(
        self,
        messages: list,
        add_generation_prompt: bool | None,
        template_kwargs: dict | None,
        tool_defs: list[dict] | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The conversation rendered by the chat template (with the tools, if any), as token ids. The
        template writes any BOS itself: ``add_special_tokens`` would add the tokenizer's again."""
        if not self.template:
            raise OpenAIError("this model has no chat template; use /v1/completions", param="messages")
        conversation = [m.conversation_entry(i) for i, m in enumerate(messages)]
        extra = dict(template_kwargs or {})
        if tool_defs:
            extra["tools"] = [{"type": "function", "function": d} for d in tool_defs]
        if self.custom_template is not None:
            extra["chat_template"] = self.custom_template

        def render() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(
                    conversation,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt is not False,
                    **extra,
                )
            except Exception as e:  # noqa: BLE001 - the template's own checks (raise_exception, ...)
                message = f"messages: the chat template refused them: {e}"
                raise OpenAIError(message, param="messages") from None
            self.check_length(text, "messages")
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

        return await self.off_loop(render)

    async def submit(
        self, request_id: str, ids: list[int], params: SamplingParams, scheduling: dict, stream: bool
    ) -> RequestStream:
        """Start a request now (so bad input fails before any response is sent). A stream gets what is new
        after each step; a plain response one output at the end."""
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        try:
            return await self.engine.add(request_id, ids, params, output_kind=kind, **scheduling)
        except ValueError as e:
            raise value_error(e) from None

    async def until_disconnect(self, raw: Request, work: Awaitable[Any]) -> Any:
        """Run ``work``; cancel it (aborting its requests) if the client goes away."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await raw.is_disconnected():
                    task.cancel()  # aborts its requests (RequestStream's read is cancelled)
                    raise OpenAIError("client disconnected", status=499)
        finally:
            if not task.done():
                task.cancel()
