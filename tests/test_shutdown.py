from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx

from .conftest import wait_until
from .sse import events

STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def stream_in_background(
    url: str, body: dict[str, Any]
) -> tuple[threading.Thread, list[Any], threading.Event]:
    received: list[Any] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for item in events(response):
                received.append(item)
                started.set()

    thread = threading.Thread(target=read)
    thread.start()
    return thread, received, started


def test_sigterm_drains_then_exits(start_server: Any) -> None:
    node = start_server(drain_timeout=30)
    body = {"messages": STORY, "max_tokens": 300, "temperature": 0.7, "seed": 3}
    thread, received, started = stream_in_background(node.url("/generate"), body)
    assert started.wait(30)
    node.process.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once (docs/api.md): within 0.3 s, the stream still in flight.
    wait_until(
        lambda: httpx.get(node.url("/health/ready")).status_code == 503,
        0.3,
        "readiness still not 503 after SIGTERM",
    )
    ready = httpx.get(node.url("/health/ready"))
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    refused = httpx.post(node.url("/generate"), json={"prompt": "hi"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    thread.join(60)
    assert received[-1][0] == "done"  # the stream in flight ran to its end
    assert received[-1][1]["finish_reason"] in ("stop", "length")
    assert node.process.wait(timeout=15) == 0


def test_drain_timeout_ends_streams_with_an_error_event(start_server: Any) -> None:
    node = start_server(drain_timeout=1)
    body = {"messages": STORY, "max_tokens": 2000, "temperature": 0.7, "seed": 3}
    thread, received, started = stream_in_background(node.url("/generate"), body)
    assert started.wait(30)
    stopped_at = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert received[-1][0] == "error"
    assert "shut down" in received[-1][1]["message"]
    assert node.process.wait(timeout=15) == 0
    assert time.monotonic() - stopped_at < 8
