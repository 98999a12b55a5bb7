"""The record of each request: its id (echoed as X-Request-ID), its metrics, and one log line
when it ends.

The log line carries what an operator needs (the id, route, status, latency, time to first
token, tokens, queue wait) and never the prompt or the answer unless `log_prompts` is on.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import DoneEvent, Generation
from ..metrics import Metrics

access_log = logging.getLogger("gguf_appliance.access")
# A client's X-Request-ID is kept when it is a plain token; anything else gets a new id, so the
# log line stays one parseable line and the header cannot smuggle anything.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
# How long the log line waits for a disconnected client's generation to end (one decode step,
# normally; a long prompt chunk on a busy node takes longer).
_SETTLE_SECONDS = 2.0


def request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return str(value.decode("ascii"))
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """`routes`: the paths the metrics and the log name; any other path is `other`."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, routes: Iterable[str], log_prompts: bool
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        # The routes leave their Generation here (request.state) for the log line.
        state: dict[str, Any] = scope.setdefault("state", {})
        body = bytearray() if self.log_prompts else None
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
                ]
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope["path"]
            route = path if path in self.routes else "other"
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
