"""ASGI middlewares of the server: the API key check and the request body size limit."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloom.server.protocol import OpenAIError

DEFAULT_MAX_BODY_BYTES = 8 << 20


class ApiKeyAuth:
    """ASGI middleware: 401 on /v1 without ``Authorization: Bearer KEY``.

    NOTE: a plain ASGI middleware, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hands the
    route a receive channel on which the client's disconnect never arrives, so ``is_disconnected()`` stayed
    false and dropped non-streaming requests ran to their end.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                err = OpenAIError("invalid or missing API key", status=401, type="authentication_error")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: answer 413 (OpenAI error body) once a request body passes ``max_bytes``, whether
    it declares its length or comes in chunks."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Callable) -> None:
        err = OpenAIError(f"request body exceeds {self.max_bytes} bytes", status=413)
        response = JSONResponse(err.body(), status_code=413)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised while the route reads a chunked body. An HTTPException, so that FastAPI passes it on instead
    of turning it into its generic 400 "error parsing the body"; the handler answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")
