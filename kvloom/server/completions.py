"""/v1/completions: one or more prompts, n completions each, streamed or whole."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvloom.outputs import CompletionOutput, PositionLogprobs
from kvloom.server import responses
from kvloom.server.context import ServerContext, value_error
from kvloom.server.protocol import CompletionRequest


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        req.refuse_unsupported()
        ctx.check_model(req.model)
        prompts = req.prompts()
        encoded = [await ctx.encode(p) for p in prompts]
        try:
            params = [
                req.sampling_params(ctx.max_tokens_for(len(ids), req.max_tokens, "prompt")) for ids in encoded
            ]
        except ValueError as e:
            raise value_error(e) from None
        await ctx.check_format(req)
        base = f"cmpl-{uuid.uuid4().hex}"
        request_ids = [f"{base}-{i}" for i in range(len(encoded))]
        created = int(time.time())
        # All prompts join the batch at once; if any is refused, the others are closed (aborted).
        started = await asyncio.gather(
            *(
                ctx.submit(rid, ids, sp, req.scheduling(), bool(req.stream))
                for rid, ids, sp in zip(request_ids, encoded, params, strict=True)
            ),
            return_exceptions=True,
        )
        streams = [s for s in started if not isinstance(s, BaseException)]
        if len(streams) < len(started):
            for s in streams:
                s.close()
            raise next(e for e in started if isinstance(e, BaseException))
        prompt_texts = [
            p if isinstance(p, str) else await ctx.off_loop(ctx.tokenizer.decode, p) for p in prompts
        ]
        n = req.n

        def choice_logprobs(
            prompt: tuple[list[int], list[PositionLogprobs | None]] | None, c: CompletionOutput, offset: int
        ) -> dict | None:
            """``prompt``: the prompt's ids and logprobs, to echo before the completion's."""
            if req.logprobs is None:
                return None
            entries: list[tuple[int, PositionLogprobs | None]] = []
            if prompt is not None:
                entries += list(zip(*prompt, strict=True))
            entries += list(zip(c.token_ids, c.logprobs or [], strict=True))
            return responses.completion_logprobs(entries, ctx.tokenizer, offset, req.logprobs)

        def head() -> dict:
            return {"id": base, "object": "text_completion", "created": created, "model": ctx.model_name}

        if req.stream:

            async def event_stream() -> AsyncIterator[str]:
                # NOTE: each output holds only what is new since the request's last one (DELTA)
                sent: dict[tuple[int, int], int] = {}  # (prompt, completion) -> characters sent
                echoed: dict[int, tuple[list[int], list[PositionLogprobs | None]]] = {}
                completion_tokens = 0
                cached: dict[int, int] = {}
                extra = {"usage": None} if req.include_usage else {}
                try:
                    async for item in responses.ending_well(responses.merge(streams)):
                        if isinstance(item, str):  # the error event
                            yield item
                            return
                        i, out = item
                        cached[i] = out.num_cached_tokens
                        if out.prompt_logprobs is not None:  # the request's first output
                            echoed[i] = (out.prompt_token_ids, out.prompt_logprobs)
                        for c in out.outputs:
                            key = (i, c.index)
                            first = key not in sent
                            text = prompt_texts[i] + c.text if req.echo and first else c.text
                            if not text and not c.finished and not c.token_ids:
                                continue
                            prompt = echoed.get(i) if req.echo and first else None
                            choice = {
                                "index": i * n + c.index,
                                "text": text,
                                "logprobs": choice_logprobs(prompt, c, sent.get(key, 0)),
                                "finish_reason": c.finish_reason,
                            }
                            sent[key] = sent.get(key, 0) + len(c.text)
                            if c.finished:
                                completion_tokens += c.num_tokens
                            yield responses.sse({**head(), "choices": [choice], **extra})
                    if req.include_usage:
                        usage = responses.usage(
                            sum(len(e) for e in encoded), completion_tokens, sum(cached.values())
                        )
                        yield responses.sse({**head(), "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                finally:
                    for s in streams:
                        s.close()

            return StreamingResponse(event_stream(), media_type="text/event-stream")

        finals = await ctx.until_disconnect(raw, asyncio.gather(*(responses.last(s) for s in streams)))
        choices = []
        completion_tokens = 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                echo = (
                    (out.prompt_token_ids, out.prompt_logprobs) if req.echo and out.prompt_logprobs else None
                )
                choices.append(
                    {
                        "index": i * n + c.index,
                        "text": (prompt_texts[i] if req.echo else "") + c.text,
                        "logprobs": choice_logprobs(echo, c, 0),
                        "finish_reason": c.finish_reason,
                    }
                )
        usage = responses.usage(
            sum(len(e) for e in encoded), completion_tokens, sum(o.num_cached_tokens for o in finals)
        )
        return JSONResponse({**head(), "choices": choices, "usage": usage})

    return api
