"""The node's own endpoints: liveness and readiness (the balancer's checks), Prometheus
metrics, and the OpenAPI document."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Engine
from ..keys import ApiKeys
from .openapi import openapi_document


async def live(request: Request) -> Response:
    return JSONResponse({"status": "live"})


async def ready(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.draining:
        status, reason = "draining", "the node is shutting down"
    elif engine.ready:
        return JSONResponse({"status": "ready", "model": request.app.state.model_id})
    elif engine.load_error:
        status, reason = "failed", engine.load_error
    else:
        status, reason = "loading", "the model is loading"
    return JSONResponse({"status": status, "reason": reason}, status_code=503)


async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    # Built per request: a SIGHUP may have turned the keys on or off.
    keys: ApiKeys = request.app.state.api_keys
    return JSONResponse(openapi_document(request.app.state.settings, keys.required))
