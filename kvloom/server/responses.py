"""Response pieces of the OpenAI endpoints: usage, SSE events, logprobs objects, and the stream helpers
(merging several requests' outputs, ending a failed stream with an error event)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from kvloom.async_engine import EngineDeadError
from kvloom.logger import init_logger
from kvloom.outputs import PositionLogprobs, RequestOutput
from kvloom.server.protocol import OpenAIError

logger = init_logger(__name__)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def ending_well(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The items of ``stream``; if it fails (shutdown, a failed step), then one string: an SSE error event
    with OpenAI's error body, followed by ``[DONE]``, so that every client sees a well-formed end."""
    try:
        async for item in stream:
            yield item
    except EngineDeadError as e:
        err = OpenAIError(str(e), status=503, type="service_unavailable")
    except Exception as e:  # noqa: BLE001 - reported to the client, logged here
        logger.exception("stream failed")
        err = OpenAIError(f"internal error: {e}", status=500, type="internal_server_error")
    else:
        return
    yield sse(err.body()) + "data: [DONE]\n\n"


async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several output streams as items arrive; closing the merge closes (aborts) them all."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await q.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put(e)
        finally:
            await q.put(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def completion_logprobs(
    entries: list[tuple[int, PositionLogprobs | None]], tokenizer: Any, offset: int, top_n: int
) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset.

    NOTE: a position's dict holds the top-N in rank order, then the chosen token if it is not among them.
    """
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in entries:
        text = entry[token_id].decoded_token if entry else tokenizer.decode([token_id])
        tokens.append(text)
        token_logprobs.append(entry[token_id].logprob if entry else None)
        top.append({lp.decoded_token: lp.logprob for lp in list(entry.values())[:top_n]} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(logprobs: list[PositionLogprobs] | None, token_ids: list[int], top_n: int) -> dict | None:
    if logprobs is None:
        return None

    def item(lp: Any) -> dict:
        return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode())}

    content = [
        {**item(entry[t]), "top_logprobs": [item(lp) for lp in list(entry.values())[:top_n]]}
        for t, entry in zip(token_ids, logprobs, strict=True)
    ]
    return {"content": content}
