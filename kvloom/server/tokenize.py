"""/tokenize and /detokenize (vLLM's): a prompt or a chat conversation as token ids, and back."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import Response

from kvloom.server.context import ServerContext
from kvloom.server.protocol import DetokenizeRequest, OpenAIError, TokenizeRequest


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        req.refuse_unsupported()
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            defs = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
            special = bool(req.add_special_tokens)
            ids = await ctx.chat_ids(
                req.messages, req.add_generation_prompt, req.chat_template_kwargs, defs, special
            )
        else:
            special = req.add_special_tokens is not False
            ids = await ctx.off_loop(lambda: ctx.tokenizer(req.prompt, add_special_tokens=special).input_ids)
        # NOTE: rendered off the loop too: a 4 MiB prompt's million ids are ~7 MB of JSON.
        payload = await ctx.off_loop(
            lambda: json.dumps({"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len})
        )
        return Response(payload, media_type="application/json")

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        req.refuse_unsupported()
        ctx.check_model(req.model)
        vocab = ctx.engine.engine.runner.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(
                f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens"
            )
        return {"prompt": await ctx.off_loop(ctx.tokenizer.decode, req.tokens)}

    return api
