"""Server-sent events: the frames, and a response that streams a generation's events.

On a 2-core node every bit of event-loop work per streamed token is taken from llama.cpp's two
decode threads, so the stream does little per event: render it, one `send` (why this is not
sse-starlette: docs/benchmarks.md). Beside the stream, one task waits for the client to leave
and cancels the generation at once, even while nothing is being sent (a request still in the
queue), and a timer puts a comment line on the wire every `ping` seconds, so proxies keep an
idle stream open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..engine import Event, Generation

PING = b": ping\r\n\r\n"


def frame(data: str, event: str | None = None) -> bytes:
    """One event: an optional `event:` line, a `data:` line per line of `data`, a blank line.

    A line end inside `data` (CRLF, LF or CR) starts a new `data:` line, which a client joins
    back with LF, as the standard says; nothing in `data` can end the event early.
    """
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"event: {event}\r\n" if event else ""
    return (head + "".join(f"data: {line}\r\n" for line in lines) + "\r\n").encode("utf-8")


class EventStreamResponse(Response):
    """`text/event-stream` of a generation: `render` turns each of its events into frames."""

    media_type = "text/event-stream"

    def __init__(
        self,
        generation: Generation,
        render: Callable[[Event], bytes],
        headers: Mapping[str, str] | None = None,
        ping: float = 15.0,
    ) -> None:
        self.generation = generation
        self.to_frames = render
        self.ping = ping
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self.generation
        gone = False
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:  # a None among the events: a ping is due
            nonlocal timer
            generation.nudge()
            timer = loop.call_later(self.ping, tick)

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            generation.cancel()  # its events end within a decode step, and with them the loop

        watcher = asyncio.ensure_future(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if self.ping:
                timer = loop.call_later(self.ping, tick)
            async with contextlib.aclosing(generation.stream()) as events:
                async for event in events:
                    if gone:
                        break
                    chunk = PING if event is None else self.to_frames(event)
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if timer is not None:
                timer.cancel()
            generation.cancel()  # a no-op once it has ended
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
