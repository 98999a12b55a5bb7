"""The real NGINX with the shipped site file in front of the real node, on loopback ports."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import RunningServer, free_port
from .nginx_runner import RunningNginx, render_site

STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = RunningServer(
        {"GGUF_APPLIANCE_N_CTX": "2048"}, tmp_path_factory.mktemp("node") / "server.log"
    )
    server.wait_ready()
    yield server
    server.stop()


def start_nginx(tmp: Path, upstream: str, lb_subnet: str = "127.0.0.1/32") -> RunningNginx:
    port = free_port()
    conf = render_site(tmp, f"127.0.0.1:{port}", upstream, lb_subnet)
    return RunningNginx(conf, port)


@pytest.fixture
def proxy(node: RunningServer, tmp_path: Path) -> Iterator[RunningNginx]:
    nginx = start_nginx(tmp_path, f"127.0.0.1:{node.port}")
    yield nginx
    nginx.stop()


def test_page_and_ready_check_through_nginx(proxy: RunningNginx) -> None:
    page = httpx.get(proxy.url + "/")
    assert page.status_code == 200 and 'src="app.js"' in page.text
    assert httpx.get(proxy.url + "/app.js").status_code == 200
    ready = httpx.get(proxy.url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_generate_streams_through_nginx_as_it_decodes(proxy: RunningNginx) -> None:
    body = {"messages": STORY, "max_tokens": 200, "temperature": 0.7, "seed": 5}
    started = time.perf_counter()
    arrivals = []
    with httpx.stream(
        "POST", proxy.url + "/generate", json=body, timeout=60, headers={"Accept-Encoding": "gzip"}
    ) as response:
        assert response.status_code == 200
        assert "content-encoding" not in response.headers  # no gzip on the event stream
        for line in response.iter_lines():
            if line.startswith("event: token"):
                arrivals.append(time.perf_counter() - started)
            if line.startswith("event: done"):
                finished = time.perf_counter() - started
    # The node sends text every STREAM_INTERVAL (0.02 s): 200 tokens at 100-200 tok/s make
    # 50-100 events. Unbuffered, they trickle in as they are sent, not in a few bursts.
    assert len(arrivals) >= 30
    assert arrivals[0] < 0.25 * finished
    assert arrivals[len(arrivals) // 2] < 0.75 * finished
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] < 0.1, gaps


def test_openai_client_through_nginx(proxy: RunningNginx) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="any", messages=STORY, max_tokens=8)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="any",
            messages=STORY,
            max_tokens=8,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def burst(url: str, n: int, **client_args: Any) -> list[httpx.Response]:
    with httpx.Client(**client_args) as client:
        return [client.get(url) for _ in range(n)]


def test_rate_limit_answers_429_per_client(proxy: RunningNginx) -> None:
    answers = burst(proxy.url + "/v1/models", 20, headers={"X-Forwarded-For": "198.51.100.7"})
    codes = [r.status_code for r in answers]
    assert codes[0] == 200 and 429 in codes
    limited = next(r for r in answers if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["retry-after"] == "1"
    # Behind the balancer (127.0.0.1 is its subnet here) another client has its own budget.
    other = httpx.get(proxy.url + "/v1/models", headers={"X-Forwarded-For": "198.51.100.8"})
    assert other.status_code == 200
    # The health check is never limited.
    assert all(r.status_code == 200 for r in burst(proxy.url + "/health/ready", 30))


def test_forwarded_for_is_ignored_from_outside_the_balancer_subnet(proxy: RunningNginx) -> None:
    # From 127.0.0.2, not the balancer: a new X-Forwarded-For per request buys no new budget.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport) as client:
        codes = [
            client.get(
                proxy.url + "/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}
            ).status_code
            for i in range(20)
        ]
    assert 429 in codes


def test_a_stopped_app_answers_503_json_through_nginx(tmp_path: Path) -> None:
    nginx = start_nginx(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        response = httpx.get(nginx.url + "/health/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert response.headers["retry-after"] == "5"
    finally:
        nginx.stop()
