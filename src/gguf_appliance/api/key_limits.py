"""Limits per client on the generation routes: requests a second and requests in flight.

A keyed request is limited by its key (NGINX's per-address limits pass it: one batch client
behind the balancer, or many users behind one office address, are not one address's worth).
A batch key has the batch limits, any other key the interactive ones. On an open API (no keys)
a request that carries a key header escapes NGINX's limits too: it is limited here by its
address (X-Real-IP, which the NGINX site sets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import RateLimited

# A client may send this many seconds' worth of its rate at once (NGINX's site: 2 r/s, burst 10).
BURST_SECONDS = 5.0


@dataclass(frozen=True)
class Limits:
    concurrency: int  # requests in flight
    rate: float  # requests a second, on average


@dataclass
class _Client:
    tokens: float
    refilled: float
    in_flight: int = 0


@dataclass
class KeyLimiter:
    interactive: Limits
    batch: Limits
    _clients: dict[bytes, _Client] = field(default_factory=dict)

    def acquire(self, client: bytes, batch: bool) -> None:
        """Count a request of `client` in, or raise RateLimited; `release` it when it ends."""
        limits = self.batch if batch else self.interactive
        burst = max(1.0, limits.rate * BURST_SECONDS)
        now = time.monotonic()
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client(burst, now)
        state.tokens = min(burst, state.tokens + (now - state.refilled) * limits.rate)
        state.refilled = now
        if state.in_flight >= limits.concurrency:
            raise RateLimited(
                f"this client already has {state.in_flight} requests in flight, its most: "
                "wait for one to end",
                retry_after=1,
            )
        if state.tokens < 1:
            raise RateLimited(
                f"this client sends over {limits.rate:g} requests a second: slow down",
                retry_after=max(1, round((1 - state.tokens) / limits.rate)),
            )
        state.tokens -= 1
        state.in_flight += 1

    def release(self, client: bytes) -> None:
        state = self._clients[client]
        state.in_flight -= 1
        if state.in_flight == 0 and len(self._clients) > 10_000:
            del self._clients[client]  # a client seen once must not hold memory for ever
