"""The Starlette application: one factory, state on app.state, no module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from .api import chat, completions, embeddings, models, node, page, responses
from .api.access_log import AccessLogMiddleware
from .api.auth import AuthMiddleware
from .api.endpoint import on_appliance_error, on_http_error
from .api.messages import messages as anthropic_messages
from .api.security_headers import SecurityHeadersMiddleware
from .embeddings import EmbeddingService
from .engine import Engine, engine_config
from .errors import ApplianceError, ModelError
from .keys import ApiKeys
from .metrics import Metrics
from .resources import static_dir
from .settings import Settings
from .sources import fetch_in_thread, source_name
from .systemd import SystemdNotifier

log = logging.getLogger("gguf_appliance.app")


# What a browser may send cross-origin: the key (either way), the body's type, a request id, the
# traffic class, and the headers the official OpenAI and Anthropic JavaScript clients add.
CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-Request-ID",
    "X-Traffic-Class",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    *(
        f"x-stainless-{name}"
        for name in (
            "arch",
            "lang",
            "os",
            "package-version",
            "runtime",
            "runtime-version",
            "retry-count",
            "timeout",
            "helper-method",
        )
    ),
]


def _model_id(settings: Settings) -> str:
    return settings.model_alias or source_name(settings.model, settings.models_dir)


def create_app(settings: Settings) -> Starlette:
    """The node's ASGI app. The model loads in the background; /health/ready says when.

    Raises KeyFileError if the API key file cannot be read or holds no key (unless open_api).
    """
    api_keys = ApiKeys(settings.api_keys, settings.api_key_file, open_api=settings.open_api)
    engine = Engine(engine_config(settings))
    app_metrics = Metrics(engine)
    embedding = EmbeddingService(settings)

    notifier = SystemdNotifier()

    async def load_model() -> None:
        try:
            path = await fetch_in_thread(
                settings.model,
                settings.models_dir,
                settings.model_sha256,
                settings.progress_interval,
            )
            # The embedder loads in the lifespan, before the chat engine, not lazily: when
            # /health/ready says 200 every route answers, and a bad EMBEDDING_MODEL shows at
            # start (in readiness and `systemctl status`), not on some later request.
            await embedding.load(path)
            await asyncio.to_thread(engine.load, path, settings.chat_template)
            notifier.notify("READY=1", f"STATUS=serving {path.name}")
        except Exception as exc:
            # A bad model is not a crash: the node stays up, says why on /health/ready and in
            # `systemctl status`, and the balancer keeps it out. Restarting would not help.
            reason = exc.message if isinstance(exc, ModelError) else f"{exc}"
            engine.fail(reason)
            log.error("the model cannot be served: %s", reason)
            notifier.notify("READY=1", f"STATUS=not serving: {reason}")

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
            engine.drain()
            for task in (loading, watchdog, lag):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(engine.close)
            await asyncio.to_thread(embedding.close)

    routes = [
        Route("/generate", page.generate, methods=["POST"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/completions", completions.completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/v1/models", models.models, methods=["GET"]),
        Route("/v1/responses", responses.responses, methods=["POST"]),
        Route("/health/live", node.live, methods=["GET"]),
        Route("/health/ready", node.ready, methods=["GET"]),
        Route("/metrics", node.metrics, methods=["GET"]),
        Route("/openapi.json", node.openapi, methods=["GET"]),
    ]
    # CORS outermost: a browser's preflight carries no key and must not meet the key check.
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=CORS_HEADERS,
                expose_headers=["Retry-After", "X-Request-ID"],
            )
        )
    # Then every request is counted and logged (also the refused ones), every response gets
    # the security headers, and only then are the Host and the key checked.
    logged = [route.path for route in routes] + ["/"]  # "/": the page; other files: "other"
    middleware += [
        Middleware(
            AccessLogMiddleware,
            metrics=app_metrics,
            routes=logged,
            log_prompts=settings.log_prompts,
        ),
        Middleware(SecurityHeadersMiddleware),
        Middleware(AuthMiddleware, settings=settings, keys=api_keys),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApplianceError: on_appliance_error, HTTPException: on_http_error},
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
    app.state.embeddings = embedding
    app.state.started_at = time.time()
    return app
