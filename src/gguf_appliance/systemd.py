"""systemd's notify protocol (sd_notify): READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

A few lines over the NOTIFY_SOCKET datagram socket, so no library is needed. Outside systemd
(no NOTIFY_SOCKET) every call does nothing. The sends never block: they come from the event loop,
and a message systemd cannot take now (its socket's queue is full) is dropped with a warning, since
a missed WATCHDOG=1 is better than a hung loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("gguf_appliance.systemd")


class SystemdNotifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds = int(usec) / 1e6 if watched else None
        # The failures warned of so far, by kind: each is logged once, not once per ping.
        self._warned: set[tuple[type[OSError], int | None]] = set()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> None:
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full queue is BlockingIOError, not a wait on the loop
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as exc:  # BlockingIOError included: the message is dropped
                kind = (type(exc), exc.errno)
                if kind not in self._warned:
                    self._warned.add(kind)
                    full = isinstance(exc, BlockingIOError)
                    log.warning(
                        "cannot notify systemd: %s; dropped %s (this failure is not logged again)",
                        "its socket's queue is full" if full else exc,
                        " ".join(fields),
                    )

    async def watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping systemd's watchdog at half its interval while `healthy()` holds.

        The pings come from the event loop, so a loop that hangs stops them and systemd restarts
        the node; `healthy` adds what the loop cannot see (the scheduler thread is alive).
        """
        if self.watchdog_seconds is None:
            return
        while True:
            if healthy():
                self.notify("WATCHDOG=1")
            else:
                log.error("not pinging the watchdog: the engine is not healthy")
            await asyncio.sleep(self.watchdog_seconds / 2)
