"""Running the app under uvicorn, with a drain on SIGTERM.

On the first SIGTERM (or Ctrl-C) the node drains: /health/ready answers 503 so the load
balancer stops sending, new generation requests get 503, and the streams in flight run to their
end for at most `drain_timeout` seconds; what is left then ends with an error event. Only then
does uvicorn close the socket and exit. A second Ctrl-C exits at once.

A node with no API key serves only on loopback (as `make run` does) unless `open_api` says the
API is meant to be open: anywhere else it would be anyone's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from .app import create_app
from .engine import Engine
from .errors import Draining
from .keys import ApiKeys, OpenApiRefused, is_loopback
from .settings import Settings

log = logging.getLogger("gguf_appliance.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.engine.drain()
            log.info("draining: %d request(s) in flight", self.engine.in_flight)
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            overdue = time.monotonic() - self.drain_started >= self.drain_timeout
            if overdue and self.engine.in_flight:
                log.warning("drain timeout: ending %d request(s)", self.engine.in_flight)
                self.engine.abort_all(Draining("the node shut down before the answer finished"))
            if overdue or not self.engine.in_flight:
                self.should_exit = True
        return await super().on_tick(counter)


def refuse_open_public_api(settings: Settings, keys: ApiKeys) -> None:
    if keys.required:
        return
    where = f"{settings.host}:{settings.port}"
    if settings.open_api:
        log.warning("open_api: no API key, the API is open to whoever reaches %s", where)
    elif is_loopback(settings.host):
        log.info("no API key: the API is open, on loopback only (%s)", where)
    else:
        raise OpenApiRefused(
            f"no API key, and the node listens on {settings.host}, beyond this machine: set "
            "GGUF_APPLIANCE_API_KEYS or GGUF_APPLIANCE_API_KEY_FILE, or "
            "GGUF_APPLIANCE_OPEN_API=true to serve an open API"
        )


def spinning_openmp(environ: Mapping[str, str]) -> str | None:
    """Why llama.cpp's OpenMP workers would spin for ever under this environment, if they would.

    libgomp's workers spin a while at each barrier, then sleep. `OMP_WAIT_POLICY=active` or an
    infinite `GOMP_SPINCOUNT` makes them spin on every core also while the node is idle
    (docs/benchmarks.md: every other process on a 2-core machine fell to a third of its rate).
    """
    policy = environ.get("OMP_WAIT_POLICY", "").strip().lower()
    spins = environ.get("GOMP_SPINCOUNT", "").strip().lower()
    if policy == "active":
        return "OMP_WAIT_POLICY=active"
    if spins in ("infinite", "infinity"):
        return f"GOMP_SPINCOUNT={spins}"
    return None


def serve(settings: Settings) -> None:
    spinning = spinning_openmp(os.environ)
    if spinning:
        log.warning(
            "%s: llama.cpp's worker threads will spin on every core even while the node is "
            "idle, starving everything else on the machine; unset it (libgomp's default spins "
            "briefly, then sleeps)",
            spinning,
        )
    app: Starlette = create_app(settings)
    refuse_open_public_api(settings, app.state.api_keys)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = DrainingServer(config, app.state.engine, settings.drain_timeout)
    server.run()
