"""The OpenAI-compatible server's app: middleware, error bodies and the engine's lifespan around the
endpoint families (info, tokenize, completions, chat), one module each."""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvloom
from kvloom.async_engine import AsyncEngine, EngineDeadError
from kvloom.logger import init_logger
from kvloom.server import chat, completions, info, tokenize
from kvloom.server.context import ServerContext
from kvloom.server.metrics import ServerMetrics
from kvloom.server.middleware import DEFAULT_MAX_BODY_BYTES, ApiKeyAuth, BodySizeLimit
from kvloom.server.protocol import OpenAIError

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
    ctx = ServerContext(engine, model_name, chat_template, tool_call_parser)

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
        ctx.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

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

    app.include_router(info.router(ctx, metrics))
    app.include_router(tokenize.router(ctx))
    app.include_router(completions.router(ctx))
    app.include_router(chat.router(ctx))
    return app
