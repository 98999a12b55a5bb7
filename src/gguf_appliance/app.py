"""The Starlette application: one factory, state on app.state, no module globals."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import openai_api
from .engine import Engine, EngineConfig
from .errors import ApplianceError, ModelError, Unauthorized, Unavailable
from .generate import generate
from .metrics import Metrics
from .resources import static_dir
from .settings import Settings
from .sources import fetch_model, resolve_source
from .systemd import SystemdNotifier

log = logging.getLogger("gguf_appliance.app")
access_log = logging.getLogger("gguf_appliance.access")

ROUTES = {
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/",
}
PROTECTED = ("/generate", "/v1/")


def error_response(error: ApplianceError) -> JSONResponse:
    headers = {}
    if isinstance(error, Unavailable) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return JSONResponse(
        openai_api.openai_error_body(error), status_code=error.status_code, headers=headers
    )


async def _appliance_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApplianceError)
    return error_response(exc)


class RequestMiddleware:
    """Per request: an id (X-Request-ID kept or made), the API key check, metrics, a log line."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or not scope["path"].startswith(PROTECTED):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Compare against every key so the time taken does not tell which one was close.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"")[:128].decode("latin-1") or uuid.uuid4().hex
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_wrapper)
            else:
                error = Unauthorized("a valid API key is required: Authorization: Bearer KEY")
                await error_response(error)(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "other"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            access_log.info(
                "%s %s %d %.3fs",
                scope["method"],
                path,
                status,
                elapsed,
                extra={
                    "request_id": request_id,
                    "route": route,
                    "status": status,
                    "latency": round(elapsed, 4),
                },
            )


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


def _model_id(settings: Settings) -> str:
    if settings.model_alias:
        return settings.model_alias
    try:
        name = resolve_source(settings.model, settings.models_dir).name
    except ModelError:
        name = settings.model.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def create_app(settings: Settings) -> Starlette:
    """The node's ASGI app. The model loads in the background; /health/ready says when."""
    engine = Engine(
        EngineConfig(
            n_ctx=settings.n_ctx,
            n_slots=settings.n_slots,
            n_batch=settings.n_batch,
            threads=settings.threads,
            queue_size=settings.queue_size,
            max_tokens_cap=settings.max_tokens_cap,
            retry_after=settings.retry_after,
            prefill_chunk=settings.prefill_chunk,
            reuse_prefix=settings.reuse_prefix,
        )
    )
    app_metrics = Metrics(engine)
    engine.on_done = app_metrics.observe_generation

    notifier = SystemdNotifier()

    async def load_model() -> None:
        try:
            info = await asyncio.to_thread(
                fetch_model,
                settings.model,
                settings.models_dir,
                sha256=settings.model_sha256,
                progress_interval=settings.progress_interval,
            )
            await asyncio.to_thread(engine.load, info.path)
            notifier.notify("READY=1", f"STATUS=serving {info.path.name}")
        except Exception as exc:
            # A bad model is not a crash: the node stays up, says why on /health/ready and in
            # `systemctl status`, and the balancer keeps it out. Restarting would not help.
            engine.load_error = exc.message if isinstance(exc, ModelError) else f"{exc}"
            log.error("the model cannot be served: %s", engine.load_error)
            notifier.notify("READY=1", f"STATUS=not serving: {engine.load_error}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        notifier.notify("STATUS=loading the model")
        loading = asyncio.create_task(load_model())
        watchdog = asyncio.create_task(notifier.watchdog(engine.healthy))
        try:
            yield
        finally:
            notifier.notify("STOPPING=1")
            engine.draining = True
            for task in (loading, watchdog):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(engine.close)

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.models, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/", StaticFiles(directory=static_dir(), html=True), name="static"),
    ]
    # CORS outermost: a browser's preflight carries no key and must not meet the key check.
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            )
        )
    middleware.append(Middleware(RequestMiddleware, settings=settings, metrics=app_metrics))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApplianceError: _appliance_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = app_metrics
    app.state.model_id = _model_id(settings)
    app.state.started_at = time.time()
    return app
