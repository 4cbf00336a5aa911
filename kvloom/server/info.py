"""Endpoints about the server: /health, /version, /v1/models, /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

import kvloom
from kvloom.async_engine import EngineDeadError
from kvloom.server.context import ServerContext
from kvloom.server.metrics import ServerMetrics
from kvloom.server.protocol import OpenAIError


def router(ctx: ServerContext, metrics: ServerMetrics | None) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_running:
            raise EngineDeadError("the engine is not running")
        return Response(status_code=200)

    @api.get("/version")
    async def version() -> dict:
        return {"version": kvloom.__version__}

    @api.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "kvloom",
                    "max_model_len": ctx.max_model_len,
                }
            ],
        }

    @api.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            raise OpenAIError("metrics are disabled", status=404)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return api
