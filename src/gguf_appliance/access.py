"""Per request: an id, the API key check, metrics, and one log line when it ends.

The log line carries what an operator needs (the id, route, status, latency, time to first
token, tokens, queue wait) and never the prompt or the answer unless `log_prompts` is on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import openai_api
from .engine import DoneEvent, Generation
from .errors import ApplianceError, MisdirectedRequest, Unauthorized, Unavailable
from .keys import ApiKeys
from .metrics import Metrics
from .settings import Settings

access_log = logging.getLogger("gguf_appliance.access")

ROUTES = {
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/openapi.json",
    "/",
}
# A client's X-Request-ID is kept when it is a plain token; anything else gets a new id, so the
# log line stays one parseable line and the header cannot smuggle anything.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
# Every response: no MIME sniffing, no framing, no referrer, and a page that runs only its own
# files (the chat page has no inline script or style) and talks only to its own origin.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]
# How long the log line waits for a disconnected client's generation to end (one decode step,
# normally; a long prompt chunk on a busy node takes longer).
_SETTLE_SECONDS = 2.0


def error_response(error: ApplianceError) -> JSONResponse:
    headers = {}
    if isinstance(error, Unavailable) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="gguf-appliance"'
    return JSONResponse(
        openai_api.openai_error_body(error), status_code=error.status_code, headers=headers
    )


def request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return str(value.decode("ascii"))
    return uuid.uuid4().hex


class RequestMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, keys: ApiKeys) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.keys = keys

    def key_required(self, path: str) -> bool:
        if not self.keys.required:
            return False
        if path.startswith(("/generate", "/v1/")) or path == "/v1":
            return True
        if path.startswith("/health/"):
            return self.settings.health_requires_key
        if path == "/metrics":
            return self.settings.metrics_requires_key
        return False

    def host_allowed(self, scope: Scope) -> bool:
        """With no key, only a Host that is an IP address, localhost or an allowed name.

        A page on evil.example whose name is re-pointed at this node (DNS rebinding) talks to
        it as evil.example: the browser's same-origin rule no longer protects an open API, but
        the Host header still says which name the page used. With keys the page has no key.
        """
        if self.keys.required or "*" in self.settings.allowed_hosts:
            return True
        value = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        if value.startswith("["):  # [v6]:port
            host = value[1:].partition("]")[0]
        else:
            host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
        host = host.rstrip(".")
        if host == "localhost" or host in self.settings.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        # The routes leave their Generation here (request.state) for the log line.
        state: dict[str, Any] = scope.setdefault("state", {})
        body = bytearray() if self.settings.log_prompts else None
        status = 500

        async def receive_and_keep() -> Message:
            message = await receive()
            if body is not None and message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("ascii")),
                    *SECURITY_HEADERS,
                ]
            await send(message)

        try:
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            if not self.host_allowed(scope):
                error: ApplianceError = MisdirectedRequest(
                    "this node does not answer to that Host name while its API is open (no "
                    "key): add it to GGUF_APPLIANCE_ALLOWED_HOSTS, or use the address",
                    param="Host",
                )
                state["error"] = error.code
                await error_response(error)(scope, receive, send_with_id)
            elif not self.key_required(scope["path"]) or self.keys.authorized(authorization):
                await self.app(scope, receive_and_keep, send_with_id)
            else:
                error = Unauthorized("a valid API key is required: Authorization: Bearer KEY")
                state["error"] = error.code
                await error_response(error)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope["path"]
            route = path if path in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            generation = state.get("generation")
            fields: dict[str, Any] = {
                "request_id": rid,
                "method": scope["method"],
                "route": route,
                "path": path,
                "status": status,
                "latency": round(elapsed, 4),
            }
            if "error" in state:
                fields["error"] = state["error"]
            try:
                if isinstance(generation, Generation):
                    outcome = await generation.settle(_SETTLE_SECONDS)
                    if isinstance(outcome, DoneEvent):
                        fields.update(_generation_fields(outcome))
                    elif outcome is not None:
                        fields["error"] = outcome.error.code
                    if body is not None:
                        fields["prompt"] = _prompt_of(bytes(body))
                        fields["output"] = "".join(generation.text)
            finally:
                access_log.info("request", extra={"fields": fields})


def _generation_fields(done: DoneEvent) -> dict[str, Any]:
    ttft = done.time_to_first_token
    return {
        "finish_reason": done.finish_reason,
        "ttft": None if ttft is None else round(ttft, 4),
        "queue_wait": round(done.queue_seconds, 4),
        "prompt_tokens": done.prompt_tokens,
        "cached_tokens": done.cached_tokens,
        "completion_tokens": done.completion_tokens,
    }


def _prompt_of(body: bytes) -> Any:
    """The prompt or messages of a request body as sent (the body itself if it does not parse)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")
    if isinstance(data, dict):
        return data.get("messages", data.get("prompt"))
    return data
