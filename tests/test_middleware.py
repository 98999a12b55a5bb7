"""The middleware in-process (no model, no socket): the request id and the log line, the
security headers, the API key and the Host check. The app is the real one from create_app,
driven without its lifespan, so generation routes answer 503 not_ready."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from gguf_appliance.api.security_headers import SECURITY_HEADERS
from gguf_appliance.app import create_app
from gguf_appliance.settings import Settings

KEY = "sk-test-0123456789abcdef"


def call(
    settings: Settings, *requests: tuple[str, str, dict[str, Any]], host: str = "127.0.0.1"
) -> tuple[list[httpx.Response], Any]:
    """Send `requests` (method, path, headers) to a fresh app; the responses and the app."""
    app = create_app(settings)

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            return [
                await client.request(
                    method,
                    path,
                    headers=headers,
                    json={"prompt": "hi"} if method == "POST" else None,
                )
                for method, path, headers in requests
            ]

    return asyncio.run(send()), app


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "gguf_appliance.access"]  # type: ignore[attr-defined]


def test_a_plain_request_id_is_echoed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gguf_appliance.access")
    [response], _ = call(Settings(), ("GET", "/health/live", {"X-Request-ID": "trace-42.a:b"}))
    assert response.headers["x-request-id"] == "trace-42.a:b"
    [line] = access_lines(caplog)
    assert line["request_id"] == "trace-42.a:b"
    assert (line["route"], line["status"], line["method"]) == ("/health/live", 200, "GET")


@pytest.mark.parametrize("sent", ["two words", "x" * 129, "a\u00e9b", ""])
def test_a_request_id_that_is_not_a_plain_token_is_replaced(
    sent: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gguf_appliance.access")
    [response], _ = call(Settings(), ("GET", "/health/live", {"X-Request-ID": sent.encode()}))
    rid = response.headers["x-request-id"]
    assert rid != sent and len(rid) == 32 and int(rid, 16) >= 0
    assert access_lines(caplog)[0]["request_id"] == rid


def test_every_response_carries_the_security_headers() -> None:
    settings = Settings(api_keys=[KEY])
    responses, _ = call(
        settings,
        ("GET", "/", {}),  # the page
        ("GET", "/health/live", {}),
        ("GET", "/v1/models", {}),  # 401
        ("GET", "/no/such/file", {}),  # 404
        ("PUT", "/health/live", {}),  # 405
    )
    assert [r.status_code for r in responses] == [200, 200, 401, 404, 405]
    for response in responses:
        for name, value in SECURITY_HEADERS:
            assert response.headers[name.decode()] == value.decode(), response.url


def test_routes_need_the_key_and_health_does_not_by_default() -> None:
    settings = Settings(api_keys=[KEY])
    good = {"Authorization": f"Bearer {KEY}"}
    bad = {"Authorization": "Bearer sk-wrong-0123456789abcdef"}
    responses, _ = call(
        settings,
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", bad),
        ("POST", "/generate", {}),
        ("GET", "/v1/models", good),
        ("POST", "/generate", good),  # past the key: the model is not loaded
        ("GET", "/health/ready", {}),
        ("GET", "/metrics", {}),
    )
    assert [r.status_code for r in responses] == [401, 401, 401, 200, 503, 503, 200]
    refused = responses[0]
    assert refused.headers["www-authenticate"] == 'Bearer realm="gguf-appliance"'
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert responses[4].json()["error"]["code"] == "not_ready"


def test_health_and_metrics_can_require_the_key() -> None:
    settings = Settings(api_keys=[KEY], health_requires_key=True, metrics_requires_key=True)
    responses, _ = call(
        settings,
        ("GET", "/health/live", {}),
        ("GET", "/metrics", {}),
        ("GET", "/metrics", {"Authorization": f"Bearer {KEY}"}),
        ("GET", "/openapi.json", {}),  # the document is never secret
    )
    assert [r.status_code for r in responses] == [401, 401, 200, 200]


@pytest.mark.parametrize(
    ("host", "allowed", "status"),
    [
        ("127.0.0.1:8000", [], 200),
        ("[::1]:8000", [], 200),
        ("localhost", [], 200),
        ("10.0.0.7", [], 200),
        ("evil.example", [], 421),
        ("evil.example:8000", [], 421),
        ("node.internal.", ["node.internal"], 200),
        ("evil.example", ["*"], 200),
    ],
)
def test_an_open_api_answers_only_to_hosts_a_rebinding_page_cannot_use(
    host: str, allowed: list[str], status: int
) -> None:
    settings = Settings(open_api=True, allowed_hosts=allowed)
    [response], _ = call(settings, ("GET", "/v1/models", {"Host": host}))
    assert response.status_code == status
    if status == 421:
        assert response.json()["error"]["param"] == "Host"


def test_with_keys_any_host_may_ask() -> None:
    settings = Settings(api_keys=[KEY])
    good = {"Authorization": f"Bearer {KEY}", "Host": "evil.example"}
    [response], _ = call(settings, ("GET", "/v1/models", good))
    assert response.status_code == 200


def test_refusals_are_counted_and_logged_with_their_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gguf_appliance.access")
    responses, app = call(
        Settings(api_keys=[KEY]),
        ("GET", "/v1/models", {}),
        ("GET", "/some/file.txt", {}),
    )
    assert [r.status_code for r in responses] == [401, 404]
    lines = access_lines(caplog)
    assert (lines[0]["route"], lines[0]["error"]) == ("/v1/models", "invalid_api_key")
    assert (lines[1]["route"], lines[1]["path"]) == ("other", "/some/file.txt")
    assert "prompt" not in lines[0] and "output" not in lines[0]
    registry = app.state.metrics.registry
    sample = registry.get_sample_value
    assert sample("gguf_appliance_requests_total", {"route": "/v1/models", "status": "401"}) == 1
    assert sample("gguf_appliance_requests_total", {"route": "other", "status": "404"}) == 1


def test_a_refused_generation_is_logged_with_its_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gguf_appliance.access")
    [response], _ = call(Settings(), ("POST", "/generate", {}))
    assert response.status_code == 503
    [line] = access_lines(caplog)
    assert (line["route"], line["status"], line["error"]) == ("/generate", 503, "not_ready")
