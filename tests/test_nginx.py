"""The real NGINX with the shipped site file in front of the real node, on loopback ports."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import expect, sync_playwright

from gguf_appliance.api.security_headers import SECURITY_HEADERS

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
    assert_hardened(limited)
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
        assert_hardened(response)
    finally:
        nginx.stop()


def assert_hardened(response: httpx.Response) -> None:
    headers = response.headers
    assert headers["server"] == "nginx"  # no version
    # Each once: NGINX's, never NGINX's and the app's side by side.
    assert headers.get_list("x-content-type-options") == ["nosniff"]
    assert headers.get_list("x-frame-options") == ["DENY"]
    assert headers.get_list("referrer-policy") == ["no-referrer"]
    (policy,) = headers.get_list("content-security-policy")
    assert "frame-ancestors 'none'" in policy


def test_every_response_forbids_sniffing_framing_and_referrers(proxy: RunningNginx) -> None:
    page = httpx.get(proxy.url + "/")
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["content-security-policy"].split(";")
    )
    # The page's own files and requests only: no inline script or style, nothing from elsewhere.
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert "unsafe" not in page.headers["content-security-policy"]
    # HTML reaches the DOM only through DOMPurify's Trusted Types policy, the only one allowed.
    assert policy["require-trusted-types-for"] == "'script'"
    assert policy["trusted-types"] == "dompurify"
    # The page gets the same policy from the app itself (make run) as through NGINX.
    assert (
        page.headers["content-security-policy"]
        == dict((k.decode(), v.decode()) for k, v in SECURITY_HEADERS)["content-security-policy"]
    )
    missing = httpx.get(proxy.url + "/no-such-file")
    assert missing.status_code == 404 and "nginx/" not in missing.text  # no version there either
    for response in (
        page,
        httpx.get(proxy.url + "/app.js"),
        httpx.get(proxy.url + "/v1/models"),
        httpx.get(proxy.url + "/health/ready"),
        missing,
    ):
        assert_hardened(response)


def test_the_page_works_under_its_content_security_policy(proxy: RunningNginx) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.add_init_script(
                "window.__refused = [];"
                "document.addEventListener('securitypolicyviolation',"
                " (e) => window.__refused.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            page.goto(proxy.url + "/")
            expect(page.locator("#status")).to_contain_text("Ready ·")
            page.fill("#prompt", "Say hello.")
            page.keyboard.press("Enter")
            answer = page.locator("#log li.assistant").first
            expect(answer.locator(".stats")).to_contain_text("tokens", timeout=30_000)
            assert page.evaluate("window.__refused") == []
            # The policy is in force: HTML given to the DOM as a string is refused (Trusted
            # Types), and so is a script put into the page.
            refused_html = page.evaluate(
                """() => {
                    try {
                        document.body.insertAdjacentHTML(
                            'beforeend', '<img src=x onerror="window.__injected = 1">');
                        return 'accepted';
                    } catch (error) {
                        return error.name;
                    }
                }"""
            )
            assert refused_html == "TypeError"
            page.evaluate(
                "() => { const s = document.createElement('script');"
                " s.append('window.__injected = 2'); document.body.append(s); }"
            )
            page.wait_for_function("window.__refused.length >= 2")
            refused = page.evaluate("window.__refused")
            assert all(r.startswith("require-trusted-types-for") for r in refused), refused
            assert page.evaluate("window.__injected === undefined")
            assert page.locator("body > img").count() == 0
        finally:
            browser.close()


def test_the_app_sees_a_request_only_once_its_body_is_whole(tmp_path: Path) -> None:
    # A stand-in for the app that notes when NGINX connects to it.
    with socket.create_server(("127.0.0.1", 0)) as app:
        nginx = start_nginx(tmp_path, f"127.0.0.1:{app.getsockname()[1]}")
        try:
            body = b'{"prompt": "' + b"x" * 100 + b'"}'
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: node\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            with socket.create_connection(
                ("127.0.0.1", int(nginx.url.rsplit(":", 1)[1]))
            ) as client:
                client.sendall(head.encode() + body[:20])
                app.settimeout(1.5)
                with pytest.raises(TimeoutError):
                    app.accept()  # half a body: the app is not bothered yet
                client.sendall(body[20:])
                app.settimeout(5)
                upstream, _ = app.accept()
                with upstream:
                    received = b""
                    while not received.endswith(body):
                        chunk = upstream.recv(65536)
                        assert chunk, received
                        received += chunk
                    upstream.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    )
                client.settimeout(5)
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            nginx.stop()


def test_a_client_that_stalls_is_dropped_within_seconds(tmp_path: Path) -> None:
    nginx = start_nginx(tmp_path, f"127.0.0.1:{free_port()}")
    port = int(nginx.url.rsplit(":", 1)[1])
    try:
        started = time.monotonic()
        stalled = {
            "headers": b"GET / HTTP/1.1\r\nHost: node\r\n",
            "body": b"POST /generate HTTP/1.1\r\nHost: node\r\nContent-Length: 100\r\n\r\n{",
        }
        clients = {}
        for what, sent in stalled.items():
            clients[what] = socket.create_connection(("127.0.0.1", port))
            clients[what].sendall(sent)
        for what, client in clients.items():
            with client:
                client.settimeout(30)
                while client.recv(65536):
                    pass  # a 408, or nothing, then the end
                assert 8 < time.monotonic() - started < 15, what
    finally:
        nginx.stop()
