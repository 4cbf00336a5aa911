"""FastAPI routes of the OpenAI-compatible server: completions, chat, models, tokenize, health, metrics."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvloom
from kvloom.async_engine import AsyncEngine, EngineDeadError
from kvloom.logger import init_logger
from kvloom.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from kvloom.sampling_params import SamplingParams
from kvloom.server import responses, tools
from kvloom.server.metrics import ServerMetrics
from kvloom.server.middleware import DEFAULT_MAX_BODY_BYTES, ApiKeyAuth, BodySizeLimit
from kvloom.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
)
from kvloom.tokenizer import FastTokenizer

logger = init_logger(__name__)


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


_TYPE_LOC = re.compile(r"^(str|int|float|bool|list|dict|function-\w+)(\[.*\])?$")


def _field_name(loc: tuple) -> str | None:
    """pydantic's error location as the request's field path ("messages[0].content"), without the union
    members and validators pydantic puts in it."""
    name = ""
    for part in loc:
        if part == "body" and not name:
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _TYPE_LOC.match(str(part)):
            name += f".{part}" if name else str(part)
    return name or None


def _longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the longest vocabulary entry as written (an upper bound on the text one token
    stands for: byte-level and sentencepiece markers take more bytes than the byte or space they mean)."""
    vocab = tokenizer._backend.get_vocab() if isinstance(tokenizer, FastTokenizer) else tokenizer.get_vocab()
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=64)


def _value_error(e: ValueError) -> OpenAIError:
    """Engine and SamplingParams errors name the field first ("temperature must be ...", "prompt: ...")."""
    m = re.match(r"^(\w+)", str(e))
    return OpenAIError(str(e), param=m.group(1) if m else None)


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: ServerMetrics | None = None,
    allowed_origins: list[str] | None = None,
    chat_template: str | None = None,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """The app. ``allowed_origins``: browser origins allowed by CORS (``["*"]`` for any); None = no CORS.
    ``chat_template``: a template in place of the model's; ``tool_call_parser``: how tool calls are read
    from the output under tool_choice "auto" (default: what the template's format calls for)."""
    config = engine.engine.config
    max_model_len = config.model.max_model_len
    # NOTE: the engine thread owns its tokenizer; handlers use their own copy (fast tokenizers must not be
    # used from two threads at once), on one thread of its own: a 7 MiB prompt took ~4 s to tokenize,
    # which on the event loop stalled /health and every stream. The tokenizers library lets go of the
    # GIL while it encodes.
    tokenizer = copy.deepcopy(engine.tokenizer)
    if isinstance(tokenizer, FastTokenizer) and tokenizer.chat_template:
        tokenizer.hf  # noqa: B018 - build the chat template's transformers tokenizer now, not in a request
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvloom-tokenizer")
    # A text longer than this in UTF-8 cannot fit in the context (each token stands for at most the
    # longest vocabulary entry's bytes; x4 for normalizers that shrink text): refused before tokenizing,
    # so a multi-MiB prompt costs no seconds of CPU beside the engine's threads.
    max_text_bytes = 4 * _longest_token_bytes(tokenizer) * max_model_len

    def check_length(text: str, field: str) -> None:
        if len(text) * 4 <= max_text_bytes:  # at most 4 bytes a character: short enough, no encoding
            return
        size = len(text.encode("utf-8"))
        if size > max_text_bytes:
            raise OpenAIError(
                f"{field}: {size} bytes of text are more tokens than this model's maximum context length "
                f"({max_model_len} tokens)",
                param=field,
            )

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args)

    async def check_format(req: Any) -> None:
        """An invalid schema, regex or grammar is a 400 naming its field before anything runs (built
        off the loop and cached: the engine's copy for the request is then cheap)."""
        params, field = req.structured()
        if params is None:
            return
        try:
            await off_loop(engine.engine.structured.matcher, params, field)
        except ValueError as e:
            raise OpenAIError(str(e), param=field) from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.is_running:
            engine.start()
        # What start-up made (torch's and transformers' modules, the tokenizer, the app: ~350k objects)
        # lives as long as the server; frozen out of the collector's sight, full collections no longer
        # walk it. Each took 210-290 ms, a stall of every request in flight (two in a 2-minute run).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()
        logger.info("Shutting down: aborting requests still in flight")
        engine.shutdown()
        tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="kvloom", version=kvloom.__version__, lifespan=lifespan)
    # NOTE: added last = outermost: CORS answers preflights before the key check, size limit after it.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in allowed_origins,
        )

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(OpenAIError(f"request body is not valid JSON: {first.get('msg')}"))
        field = _field_name(tuple(first.get("loc", ())))
        return _error(OpenAIError(f"{field or 'body'}: {first.get('msg', 'invalid request')}", param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(OpenAIError(str(e.detail), status=e.status_code, type="invalid_request_error"))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(OpenAIError(str(e), status=503, type="service_unavailable"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return _error(OpenAIError(f"internal error: {e}", status=500, type="internal_server_error"))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def max_tokens_for(prompt_len: int, requested: int | None, field: str) -> int:
        if requested is not None and requested < 1:
            raise OpenAIError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
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

    async def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise OpenAIError("prompt must not be empty", param="prompt")
            check_length(prompt, "prompt")
            return await off_loop(lambda: tokenizer(prompt).input_ids)
        return list(prompt)

    template = chat_template or getattr(tokenizer, "chat_template", None)
    parser = tool_call_parser or tools.pick_parser(template)

    async def chat_ids(
        messages: list,
        add_generation_prompt: bool | None,
        template_kwargs: dict | None,
        tool_defs: list[dict] | None = None,
    ) -> list[int]:
        if not template:
            raise OpenAIError("this model has no chat template; use /v1/completions", param="messages")
        conversation = [m.conversation_entry(i) for i, m in enumerate(messages)]
        extra = dict(template_kwargs or {})
        if tool_defs:
            extra["tools"] = [{"type": "function", "function": d} for d in tool_defs]
        if chat_template is not None:
            extra["chat_template"] = chat_template

        def render() -> list[int]:
            try:
                text = tokenizer.apply_chat_template(
                    conversation,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt is not False,
                    **extra,
                )
            except Exception as e:  # noqa: BLE001 - the template's own checks (raise_exception, ...)
                message = f"messages: the chat template refused them: {e}"
                raise OpenAIError(message, param="messages") from None
            check_length(text, "messages")
            return tokenizer(text, add_special_tokens=False).input_ids

        return await off_loop(render)

    async def submit(
        request_id: str, ids: list[int], params: SamplingParams, scheduling: dict
    ) -> AsyncIterator[RequestOutput]:
        """Start a request now (so bad input fails before any response is sent)."""
        gen = engine.generate(request_id, ids, params, **scheduling)
        try:
            first = await gen.__anext__()
        except ValueError as e:
            raise _value_error(e) from None

        async def rest() -> AsyncIterator[RequestOutput]:
            try:
                yield first
                async for out in gen:
                    yield out
            finally:
                await gen.aclose()

        return rest()

    async def until_disconnect(raw: Request, work: Awaitable[Any]) -> Any:
        """Run ``work``; cancel it (aborting its requests) if the client goes away."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await raw.is_disconnected():
                    task.cancel()  # aborts its requests (AsyncEngine.generate's finally)
                    raise OpenAIError("client disconnected", status=499)
        finally:
            if not task.done():
                task.cancel()

    # ---- plain routes -----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            raise EngineDeadError("the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": kvloom.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "kvloom",
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            raise OpenAIError("metrics are disabled", status=404)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        req.refuse_unsupported()
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            defs = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
            ids = await chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs, defs)
        else:
            special = req.add_special_tokens
            ids = await off_loop(lambda: tokenizer(req.prompt, add_special_tokens=special).input_ids)
        # NOTE: rendered off the loop too: a 4 MiB prompt's million ids are ~7 MB of JSON.
        payload = await off_loop(
            lambda: json.dumps({"tokens": ids, "count": len(ids), "max_model_len": max_model_len})
        )
        return Response(payload, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        req.refuse_unsupported()
        check_model(req.model)
        vocab = engine.engine.runner.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(
                f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens"
            )
        return {"prompt": await off_loop(tokenizer.decode, req.tokens)}

    # ---- completions ------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        req.refuse_unsupported()
        check_model(req.model)
        prompts = req.prompts()
        encoded = [await encode(p) for p in prompts]
        try:
            params = [
                req.sampling_params(max_tokens_for(len(ids), req.max_tokens, "prompt")) for ids in encoded
            ]
        except ValueError as e:
            raise _value_error(e) from None
        await check_format(req)
        base = f"cmpl-{uuid.uuid4().hex}"
        request_ids = [f"{base}-{i}" for i in range(len(encoded))]
        created = int(time.time())
        # All prompts join the batch at once; if any is refused, the others are closed (aborted).
        started = await asyncio.gather(
            *(
                submit(rid, ids, sp, req.scheduling())
                for rid, ids, sp in zip(request_ids, encoded, params, strict=True)
            ),
            return_exceptions=True,
        )
        streams = [s for s in started if not isinstance(s, BaseException)]
        if len(streams) < len(started):
            for rid, s in zip(request_ids, started, strict=True):
                if not isinstance(s, BaseException):
                    engine.abort(rid, "error")
                    await s.aclose()
            raise next(e for e in started if isinstance(e, BaseException))
        prompt_texts = [p if isinstance(p, str) else await off_loop(tokenizer.decode, p) for p in prompts]
        n = req.n

        def choice_logprobs(out: RequestOutput, c: CompletionOutput, start: int, offset: int) -> dict | None:
            if req.logprobs is None:
                return None
            entries: list[tuple[int, PositionLogprobs | None]] = []
            if req.echo and start == 0 and out.prompt_logprobs is not None:
                entries += list(zip(out.prompt_token_ids, out.prompt_logprobs, strict=True))
            entries += list(zip(c.token_ids[start:], (c.logprobs or [])[start:], strict=True))
            return responses.completion_logprobs(entries, tokenizer, offset, req.logprobs)

        if req.stream:

            async def event_stream() -> AsyncIterator[str]:
                sent_text: dict[tuple[int, int], int] = {}  # (prompt, completion) -> characters sent
                sent_tokens: dict[tuple[int, int], int] = {}
                done: set[tuple[int, int]] = set()
                completion_tokens = 0
                cached: dict[int, int] = {}
                async for item in responses.ending_well(responses.merge(streams)):
                    if isinstance(item, str):  # the error event
                        yield item
                        return
                    i, out = item
                    cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        key = (i, c.index)
                        if key in done:
                            continue
                        start, offset = sent_tokens.get(key, 0), sent_text.get(key, 0)
                        text = c.text[offset:]
                        if req.echo and key not in sent_text:
                            text = prompt_texts[i] + text
                        if not text and not c.finished and start == len(c.token_ids):
                            continue
                        choice = {
                            "index": i * n + c.index,
                            "text": text,
                            "logprobs": choice_logprobs(out, c, start, offset),
                            "finish_reason": c.finish_reason if c.finished else None,
                        }
                        sent_text[key], sent_tokens[key] = len(c.text), len(c.token_ids)
                        if c.finished:
                            done.add(key)
                            completion_tokens += len(c.token_ids)
                        yield responses.sse(
                            {
                                "id": base,
                                "object": "text_completion",
                                "created": created,
                                "model": model_name,
                                "choices": [choice],
                                **({"usage": None} if req.include_usage else {}),
                            }
                        )
                if req.include_usage:
                    usage = responses.usage(
                        sum(len(e) for e in encoded), completion_tokens, sum(cached.values())
                    )
                    yield responses.sse(
                        {
                            "id": base,
                            "object": "text_completion",
                            "created": created,
                            "model": model_name,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                yield "data: [DONE]\n\n"

            return StreamingResponse(event_stream(), media_type="text/event-stream")

        finals = await until_disconnect(raw, asyncio.gather(*(responses.last(s) for s in streams)))
        choices = []
        completion_tokens = 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = (prompt_texts[i] if req.echo else "") + c.text
                choices.append(
                    {
                        "index": i * n + c.index,
                        "text": text,
                        "logprobs": choice_logprobs(out, c, 0, 0),
                        "finish_reason": c.finish_reason,
                    }
                )
        usage = responses.usage(
            sum(len(e) for e in encoded), completion_tokens, sum(o.num_cached_tokens for o in finals)
        )
        return JSONResponse(
            {
                "id": base,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": usage,
            }
        )

    # ---- chat completions -------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        req.refuse_unsupported()
        check_model(req.model)
        mode = req.tool_mode
        if mode == "auto" and parser is None:
            field = "tools" if req.tool_choice is None else "tool_choice"
            raise OpenAIError(
                f"{field}: tool_choice auto needs a tool-call format kvloom can read, and this chat template "
                "has none; serve with --tool-call-parser or --chat-template, or ask for tool_choice required "
                "or a named function",
                param=field,
            )
        defs = req.tool_defs() if mode is not None else None
        ids = await chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs, defs)
        try:
            params = req.sampling_params(max_tokens_for(len(ids), req.requested_max_tokens(), "messages"))
        except ValueError as e:
            raise _value_error(e) from None
        await check_format(req)
        names = {d["name"] for d in defs or []}

        def tool_calls(text: str) -> tuple[str | None, list[tools.ToolCall]]:
            """(content, calls) of a finished output under this request's tool mode."""
            if mode == "required":
                return None, tools.calls_from_required(text)
            if mode == "named":
                return None, [tools.ToolCall(req.tool_choice.function.name, text)]
            if mode == "auto":
                return tools.PARSERS[parser].parse(text, names)
            return text, []

        top_n = req.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = await submit(request_id, ids, params, req.scheduling())

        def head(obj: str) -> dict:
            return {"id": request_id, "object": obj, "created": created, "model": model_name}

        if req.stream:

            async def event_stream() -> AsyncIterator[str]:
                sent_text: dict[int, int] = {}
                sent_tokens: dict[int, int] = {}
                done: set[int] = set()
                completion_tokens = 0
                cached = 0
                extra = {"usage": None} if req.include_usage else {}
                async for out in responses.ending_well(stream):
                    if isinstance(out, str):  # the error event
                        yield out
                        return
                    cached = out.num_cached_tokens
                    for c in out.outputs:
                        if c.index in done:
                            continue
                        if c.index not in sent_text:
                            sent_text[c.index] = sent_tokens[c.index] = 0
                            role = {
                                "index": c.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            yield responses.sse({**head("chat.completion.chunk"), "choices": [role], **extra})
                        # under tools, the text of calls is not streamed as content: required / named
                        # hold it all, auto from the parser's start marker on
                        shown = len(c.text)
                        if mode in ("required", "named"):
                            shown = 0
                        elif mode == "auto":
                            shown = tools.PARSERS[parser].shown(c.text)
                        text = c.text[sent_text[c.index] : max(shown, sent_text[c.index])]
                        start = sent_tokens[c.index]
                        if text or start < len(c.token_ids):
                            lp = responses.chat_logprobs(
                                c.logprobs[start:] if c.logprobs else None, c.token_ids[start:], top_n
                            )
                            delta = {
                                "index": c.index,
                                "delta": {"content": text},
                                "logprobs": lp,
                                "finish_reason": None,
                            }
                            sent_text[c.index] += len(text)
                            sent_tokens[c.index] = len(c.token_ids)
                            if text or lp:
                                yield responses.sse(
                                    {**head("chat.completion.chunk"), "choices": [delta], **extra}
                                )
                        if c.finished:
                            done.add(c.index)
                            completion_tokens += len(c.token_ids)
                            finish = c.finish_reason
                            if mode is not None:  # what was held back: the calls, or text after all
                                calls: list[tools.ToolCall] = []
                                content = c.text
                                if finish == "stop":
                                    content, calls = tool_calls(c.text)
                                held: dict[str, Any] = {}
                                rest = (content or "")[sent_text[c.index] :]
                                if rest:
                                    held["content"] = rest
                                if calls:
                                    held["tool_calls"] = [x.to_openai(i) for i, x in enumerate(calls)]
                                    finish = "tool_calls"
                                if held:
                                    chunk = {
                                        "index": c.index,
                                        "delta": held,
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                    yield responses.sse(
                                        {**head("chat.completion.chunk"), "choices": [chunk], **extra}
                                    )
                            last = {
                                "index": c.index,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                            yield responses.sse({**head("chat.completion.chunk"), "choices": [last], **extra})
                if req.include_usage:
                    usage = responses.usage(len(ids), completion_tokens, cached)
                    yield responses.sse({**head("chat.completion.chunk"), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return StreamingResponse(event_stream(), media_type="text/event-stream")

        out = await until_disconnect(raw, responses.last(stream))
        choices = []
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish_reason
            if mode is not None and finish == "stop":
                content, calls = tool_calls(c.text)
                if calls:
                    message = {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [x.to_openai() for x in calls],
                    }
                    finish = "tool_calls"
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

    return app
