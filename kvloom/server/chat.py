"""/v1/chat/completions: a conversation through the chat template, with tools, streamed or whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvloom.outputs import CompletionOutput
from kvloom.server import responses, tools
from kvloom.server.context import ServerContext, value_error
from kvloom.server.protocol import ChatCompletionRequest, OpenAIError


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        req.refuse_unsupported()
        ctx.check_model(req.model)
        mode = req.tool_mode
        if mode == "auto" and ctx.parser is None:
            field = "tools" if req.tool_choice is None else "tool_choice"
            raise OpenAIError(
                f"{field}: tool_choice auto needs a tool-call format kvloom can read, and this chat template "
                "has none; serve with --tool-call-parser or --chat-template, or ask for tool_choice required "
                "or a named function",
                param=field,
            )
        defs = req.tool_defs() if mode is not None else None
        ids = await ctx.chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs, defs)
        try:
            params = req.sampling_params(ctx.max_tokens_for(len(ids), req.requested_max_tokens(), "messages"))
        except ValueError as e:
            raise value_error(e) from None
        await ctx.check_format(req)
        names = {d["name"] for d in defs or []}

        def call_stream() -> tools.CallStream | None:
            """How one choice's output is read under this request's tools (None: all of it is content)."""
            if mode is None:
                return None
            function = req.tool_choice.function.name if mode == "named" else None
            return tools.CallStream(mode, tools.PARSERS.get(ctx.parser), names, function)

        top_n = req.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = await ctx.submit(request_id, ids, params, req.scheduling(), bool(req.stream))

        def head(obj: str) -> dict:
            return {"id": request_id, "object": obj, "created": created, "model": ctx.model_name}

        if req.stream:
            extra = {"usage": None} if req.include_usage else {}

            def chunk(
                index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None
            ) -> str:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                return responses.sse({**head("chat.completion.chunk"), "choices": [choice], **extra})

            def deltas(c: CompletionOutput, reader: tools.CallStream | None) -> list[dict]:
                """What one step adds to a choice (text is held back under tools while it may be a call)."""
                if reader is None:
                    return [{"content": c.text}] if c.text else []
                return reader.feed(c.text)

            async def event_stream() -> AsyncIterator[str]:
                # NOTE: each output holds only what is new since the last one (DELTA)
                readers: dict[int, tools.CallStream | None] = {}
                completion_tokens = 0
                cached = 0
                try:
                    async for out in responses.ending_well(stream):
                        if isinstance(out, str):  # the error event
                            yield out
                            return
                        cached = out.num_cached_tokens
                        for c in out.outputs:
                            if c.index not in readers:
                                readers[c.index] = call_stream()
                                yield chunk(c.index, {"role": "assistant", "content": ""})
                            reader = readers[c.index]
                            new = deltas(c, reader)
                            lp = (
                                responses.chat_logprobs(c.logprobs, c.token_ids, top_n)
                                if c.token_ids
                                else None
                            )
                            if lp and not new:  # the tokens' logprobs go out even while their text is held
                                new = [{"content": ""}]
                            for i, delta in enumerate(new):
                                yield chunk(c.index, delta, lp if i == 0 else None)
                            if c.finished:
                                completion_tokens += c.num_tokens
                                finish = c.finish_reason
                                if reader is not None:
                                    rest, finish = reader.finish(finish)
                                    for delta in rest:
                                        yield chunk(c.index, delta)
                                yield chunk(c.index, {}, finish=finish)
                    if req.include_usage:
                        usage = responses.usage(len(ids), completion_tokens, cached)
                        yield responses.sse({**head("chat.completion.chunk"), "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                finally:
                    stream.close()

            return StreamingResponse(event_stream(), media_type="text/event-stream")

        try:
            out = await ctx.until_disconnect(raw, responses.last(stream))
        finally:
            stream.close()
        choices = []
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish_reason
            reader = call_stream()
            if reader is not None:
                pieces = reader.feed(c.text)
                rest, finish = reader.finish(finish)
                content, calls = tools.assemble(pieces + rest)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": responses.chat_logprobs(c.logprobs, c.token_ids, top_n),
                    "finish_reason": finish,
                }
            )
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse(
            {
                **head("chat.completion"),
                "choices": choices,
                "usage": responses.usage(len(ids), completion_tokens, out.num_cached_tokens),
            }
        )

    return api
