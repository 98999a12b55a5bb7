"""Who may ask: the API key on the routes that need one, and, while the API is open (no key),
only Host names that cannot be a rebound attacker's."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ApplianceError, MisdirectedRequest, Unauthorized
from ..keys import ApiKeys
from ..settings import Settings
from . import messages
from .endpoint import error_response


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, keys: ApiKeys) -> None:
        self.app = app
        self.settings = settings
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
        error: ApplianceError | None = None
        if not self.host_allowed(scope):
            error = MisdirectedRequest(
                "this node does not answer to that Host name while its API is open (no "
                "key): add it to GGUF_APPLIANCE_ALLOWED_HOSTS, or use the address",
                param="Host",
            )
        elif self.key_required(scope["path"]):
            headers = dict(scope["headers"])
            authorized = self.keys.authorized(headers.get(b"authorization", b""))
            anthropic_key = headers.get(b"x-api-key")  # what Anthropic's clients send
            if not authorized and anthropic_key is not None and scope["path"] == messages.PATH:
                authorized = self.keys.authorized(b"Bearer " + anthropic_key)
            if not authorized:
                how = "Authorization: Bearer KEY"
                if scope["path"] == messages.PATH:
                    how += " or x-api-key: KEY"
                error = Unauthorized(f"a valid API key is required: {how}")
        if error is None:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["error"] = error.code  # for the request's log line
        # /v1/messages answers every error in Anthropic's shape, for its clients' classes.
        shaped = messages.error_response if scope["path"] == messages.PATH else error_response
        await shaped(error)(scope, receive, send)
