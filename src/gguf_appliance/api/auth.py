"""Who may ask: the API key on the routes that need one, and, while the API is open (no key),
only Host names that cannot be a rebound attacker's; then each client's limits (key_limits)
and the request's traffic class: batch for a batch key, or for a request that says
`X-Traffic-Class: batch` (a request can lower its class, never raise it)."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ApplianceError, MisdirectedRequest, Unauthorized
from ..keys import ApiKeys
from ..settings import Settings
from . import messages
from .endpoint import error_response
from .key_limits import KeyLimiter, Limits

TRAFFIC_CLASS_HEADER = b"x-traffic-class"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, keys: ApiKeys) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        self.limits = KeyLimiter(
            interactive=Limits(settings.key_concurrency, settings.key_rate),
            batch=Limits(settings.batch_key_concurrency, settings.batch_key_rate),
        )

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

    def limited_client(
        self, headers: dict[bytes, bytes], key: bytes | None, scope: Scope
    ) -> bytes | None:
        """Who a request's limits count against: its key; on an open API, the address of a
        request with a key header (NGINX's per-address limits let it pass); else nobody."""
        if key is not None:
            return b"key:" + key
        if self.keys.required or not {b"authorization", b"x-api-key"} & headers.keys():
            return None
        address = headers.get(b"x-real-ip") or (scope.get("client") or ("",))[0].encode()
        return b"address:" + address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error: ApplianceError | None = None
        headers = dict(scope["headers"])
        key: bytes | None = None
        if not self.host_allowed(scope):
            error = MisdirectedRequest(
                "this node does not answer to that Host name while its API is open (no "
                "key): add it to GGUF_APPLIANCE_ALLOWED_HOSTS, or use the address",
                param="Host",
            )
        elif self.key_required(scope["path"]):
            key = self.keys.match(headers.get(b"authorization", b""))
            anthropic_key = headers.get(b"x-api-key")  # what Anthropic's clients send
            if key is None and anthropic_key is not None and scope["path"] == messages.PATH:
                key = self.keys.match(b"Bearer " + anthropic_key)
            if key is None:
                how = "Authorization: Bearer KEY"
                if scope["path"] == messages.PATH:
                    how += " or x-api-key: KEY"
                error = Unauthorized(f"a valid API key is required: {how}")
        state: dict[str, Any] = scope.setdefault("state", {})
        path = scope["path"]
        if error is None and (path.startswith(("/generate", "/v1/")) or path == "/v1"):
            batch_key = key is not None and self.keys.is_batch(key)
            said = headers.get(TRAFFIC_CLASS_HEADER, b"").strip().lower() == b"batch"
            state["batch"] = batch_key or said
            client = self.limited_client(headers, key, scope)
            if client is not None:
                try:
                    self.limits.acquire(client, batch_key)
                except ApplianceError as exc:
                    error = exc
                else:
                    try:
                        await self.app(scope, receive, send)
                    finally:
                        self.limits.release(client)
                    return
        if error is None:
            await self.app(scope, receive, send)
            return
        state["error"] = error.code  # for the request's log line
        # /v1/messages answers every error in Anthropic's shape, for its clients' classes.
        shaped = messages.error_response if scope["path"] == messages.PATH else error_response
        await shaped(error)(scope, receive, send)
