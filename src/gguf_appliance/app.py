"""The Starlette application: one factory, state on app.state, no module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from . import openai_api
from .access import RequestMiddleware, error_response
from .engine import Engine, engine_config, load_configured_model
from .errors import ApplianceError, ModelError
from .generate import generate
from .keys import ApiKeys
from .metrics import Metrics
from .openapi import openapi_document
from .resources import static_dir
from .settings import Settings
from .sources import redact_source, resolve_source
from .systemd import SystemdNotifier

log = logging.getLogger("gguf_appliance.app")


async def _appliance_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApplianceError)
    request.state.error = exc.code  # for the request's log line
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    # 404 and 405 in the API's error shape too, so a client has one format to read.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {
        "error": {
            "message": exc.detail,
            "type": "invalid_request_error",
            "param": None,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


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


async def openapi(request: Request) -> Response:
    # Built per request: a SIGHUP may have turned the keys on or off.
    keys: ApiKeys = request.app.state.api_keys
    return JSONResponse(openapi_document(request.app.state.settings, keys.required))


async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _model_id(settings: Settings) -> str:
    if settings.model_alias:
        return settings.model_alias
    try:
        name = resolve_source(settings.model, settings.models_dir).name
    except ModelError:
        name = redact_source(settings.model).rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def create_app(settings: Settings) -> Starlette:
    """The node's ASGI app. The model loads in the background; /health/ready says when.

    Raises KeyFileError if the API key file cannot be read or holds no key (unless open_api).
    """
    api_keys = ApiKeys(settings.api_keys, settings.api_key_file, open_api=settings.open_api)
    engine = Engine(engine_config(settings))
    app_metrics = Metrics(engine)
    engine.on_done = app_metrics.observe_generation

    notifier = SystemdNotifier()

    async def load_model() -> None:
        try:
            path = await load_configured_model(engine, settings)
            notifier.notify("READY=1", f"STATUS=serving {path.name}")
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
        lag = asyncio.create_task(app_metrics.watch_event_loop())
        loop = asyncio.get_running_loop()
        # SIGHUP (`systemctl reload`) re-reads the key file. Signals reach only the main thread.
        hangup = threading.current_thread() is threading.main_thread()
        if hangup:

            def reload_keys() -> None:
                if not api_keys.reload():
                    notifier.notify(
                        "STATUS=API keys not reloaded (see the log): the keys in force stay"
                    )

            loop.add_signal_handler(signal.SIGHUP, reload_keys)
        try:
            yield
        finally:
            if hangup:
                loop.remove_signal_handler(signal.SIGHUP)
            notifier.notify("STOPPING=1")
            engine.draining = True
            for task in (loading, watchdog, lag):
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
        Route("/openapi.json", openapi, methods=["GET"]),
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
                expose_headers=["Retry-After", "X-Request-ID"],
            )
        )
    middleware.append(
        Middleware(RequestMiddleware, settings=settings, metrics=app_metrics, keys=api_keys)
    )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApplianceError: _appliance_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    # The page's files answer whatever no route matches. Not a Mount("/"): that would take
    # requests with a route's path but another method (OPTIONS /generate) and answer them
    # as files, with a 405 that names the wrong methods.
    app.router.default = StaticFiles(directory=static_dir(), html=True)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = app_metrics
    app.state.api_keys = api_keys
    app.state.model_id = _model_id(settings)
    app.state.started_at = time.time()
    return app
