from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from .conftest import RunningServer, slot_held, wait_until
from .sse import events

CHAT = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
CANCELLED = 'gguf_appliance_generations_total{finish_reason="cancelled"}'


def stream(server: RunningServer, body: dict[str, Any]) -> list[tuple[str, Any]]:
    with httpx.stream("POST", server.url("/generate"), json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def test_generate_streams_token_events_then_one_done_event(server: RunningServer) -> None:
    received = stream(server, {"messages": CHAT, "max_tokens": 32, "temperature": 0})
    names = [name for name, _ in received]
    assert names[-1] == "done"
    assert set(names[:-1]) == {"token"} and len(names) > 5
    done = received[-1][1]
    assert done["finish_reason"] == "length"
    assert done["completion_tokens"] == 32
    assert done["prompt_tokens"] > 10
    assert 0 < done["time_to_first_token"] < 5
    assert done["tokens_per_second"] > 1


def test_generate_takes_a_raw_prompt(server: RunningServer) -> None:
    received = stream(server, {"prompt": "The capital of France is", "max_tokens": 8})
    text = "".join(data["text"] for name, data in received if name == "token")
    assert text and received[-1][0] == "done"


def test_japanese_and_emoji_stream_intact_and_equal_the_unstreamed_answer(
    server: RunningServer,
) -> None:
    for prompt in (
        "Translate to Japanese: Good morning, my friend.",
        "Use emojis to describe a happy day at the beach.",
    ):
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 48,
            "temperature": 0,
        }
        pieces = [d["text"] for n, d in stream(server, body) if n == "token"]
        whole = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60).json()
        text = whole["choices"][0]["message"]["content"]
        assert "".join(pieces) == text
        assert "\ufffd" not in text
        assert any(ord(ch) > 0x3000 for ch in text), text  # CJK or emoji really came out
        # Byte-level tokens: these characters took several tokens each, so pieces were split.
        assert whole["usage"]["completion_tokens"] > len(text)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"prompt": "hi"', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}', "exactly one"),
        (b"{}", "exactly one"),
        (b'{"prompt": "hi", "temperature": 3}', "temperature"),
        (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 100000}', "at most"),
        (b'{"prompt": "hi", "top_p": 0}', "top_p"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    ],
)
def test_bad_requests_get_400_with_a_clear_message(
    server: RunningServer, body: bytes, needle: str
) -> None:
    response = httpx.post(
        server.url("/generate"), content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_gets_400_saying_so(server: RunningServer) -> None:
    response = httpx.post(server.url("/generate"), json={"prompt": "word " * 3000}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "the context holds 2048 tokens" in error["message"]


def test_body_over_the_limit_gets_413(server: RunningServer) -> None:
    response = httpx.post(server.url("/generate"), json={"prompt": "x" * 1_100_000})
    assert response.status_code == 413


def test_client_disconnect_stops_generation(server: RunningServer) -> None:
    cancelled = server.metric(CANCELLED, default=0)
    body = {"messages": CHAT, "max_tokens": 1500, "temperature": 0.7, "seed": 1}
    with httpx.stream("POST", server.url("/generate"), json=body, timeout=60) as response:
        received = events(response)
        for _ in range(5):
            assert next(received)[0] == "token"
    # The connection is closed here, mid-answer.
    wait_until(
        lambda: (
            server.metric("gguf_appliance_busy_slots") == 0
            and server.metric(CANCELLED, default=0) > cancelled
        ),
        10,
        "the slot never freed with the generation counted as cancelled",
    )
    # And nothing more is generated: the token count stays put over the next second.
    after_close = server.metric("gguf_appliance_completion_tokens_total")
    window_end = time.monotonic() + 1.0
    while time.monotonic() < window_end:
        assert server.metric("gguf_appliance_completion_tokens_total") == after_close
        time.sleep(0.05)


def test_full_queue_gets_503_with_retry_after(start_server: Any) -> None:
    node = start_server(n_slots=1, queue_size=0, retry_after=7)
    with slot_held(node):
        response = httpx.post(node.url("/generate"), json={"prompt": "hi"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"]["code"] == "queue_full"
    # The slot is free again once the holder has gone.
    wait_until(
        lambda: node.metric("gguf_appliance_busy_slots") == 0, 10, "the held slot never freed"
    )
    again = httpx.post(node.url("/generate"), json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert again.status_code == 200


def test_a_queued_stream_gets_keepalive_pings_and_leaving_frees_its_place(
    start_server: Any,
) -> None:
    node = start_server(n_slots=1, queue_size=1, ping_interval=0.3)
    with slot_held(node):
        body = {"prompt": "hello", "max_tokens": 4}
        with httpx.stream("POST", node.url("/generate"), json=body, timeout=30) as response:
            assert response.status_code == 200
            started = time.monotonic()
            lines = response.iter_lines()
            pings = 0
            while pings < 3:
                line = next(lines)
                assert not line.startswith("event:"), "the queued request was answered early"
                pings += line == ": ping"
            assert time.monotonic() - started < 3
            assert node.metric("gguf_appliance_queue_depth") == 1
        # Left while queued: its place in the queue is free again without waiting for a slot.
        wait_until(
            lambda: node.metric("gguf_appliance_queue_depth") == 0,
            5,
            "the place of the request that left never freed",
        )
        assert node.metric("gguf_appliance_busy_slots") == 1
