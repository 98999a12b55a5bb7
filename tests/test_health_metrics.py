from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gguf_appliance.app import create_app
from gguf_appliance.settings import Settings

from .conftest import RunningServer, wait_until


def test_ready_is_503_loading_before_the_model_is_loaded() -> None:
    # The app without its lifespan: the model has not started loading.
    app = create_app(Settings())

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (
                await client.get("/health/live"),
                await client.get("/health/ready"),
                await client.post("/generate", json={"prompt": "hi"}),
            )

    live, ready, generate = asyncio.run(probe())
    assert live.status_code == 200
    assert ready.status_code == 503
    assert ready.json() == {"status": "loading", "reason": "the model is loading"}
    assert generate.status_code == 503
    assert generate.json()["error"]["code"] == "not_ready"


def test_ready_is_200_with_the_model_once_loaded(server: RunningServer) -> None:
    response = httpx.get(server.url("/health/ready"))
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": "SmolLM2-135M-Instruct.Q4_1"}


def loading(node: RunningServer) -> bool:
    return bool(httpx.get(node.url("/health/ready")).json()["status"] == "loading")


def test_a_missing_model_keeps_ready_503_with_the_reason(start_server: Any, tmp_path: Any) -> None:
    node = start_server(ready=False, model=str(tmp_path / "absent.gguf"))
    node.wait_live()
    wait_until(lambda: not loading(node), 5, "the model never stopped loading")
    ready = httpx.get(node.url("/health/ready"))
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed"
    assert "model file not found" in ready.json()["reason"]
    assert node.process.poll() is None  # no crash loop: the node stays up and says why
    response = httpx.post(node.url("/generate"), json={"prompt": "hi"})
    assert response.status_code == 503
    assert "model file not found" in response.json()["error"]["message"]


def test_a_corrupt_model_is_refused_with_one_line(start_server: Any, tmp_path: Any) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 200)
    node = start_server(ready=False, model=str(bad))
    node.wait_live()
    wait_until(lambda: not loading(node), 5, "the model never stopped loading")
    ready = httpx.get(node.url("/health/ready")).json()
    assert ready["status"] == "failed"
    assert "corrupt or truncated GGUF file" in ready["reason"]
    assert "Traceback" not in node.log()


def test_metrics_expose_requests_tokens_latency_queue_and_load_time(server: RunningServer) -> None:
    httpx.post(server.url("/v1/completions"), json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    text = httpx.get(server.url("/metrics")).text
    for family in (
        'gguf_appliance_requests_total{route="/v1/completions",status="200"}',
        'gguf_appliance_request_duration_seconds_bucket{le="0.5",route="/v1/completions"}',
        "gguf_appliance_time_to_first_token_seconds_count",
        "gguf_appliance_prompt_tokens_total",
        "gguf_appliance_completion_tokens_total",
        "gguf_appliance_queue_depth",
        "gguf_appliance_busy_slots",
        "gguf_appliance_model_load_seconds",
        "process_resident_memory_bytes",
    ):
        assert family in text, family
    assert server.metric("gguf_appliance_model_load_seconds") > 0
    assert server.metric("gguf_appliance_completion_tokens_total") >= 1
    assert server.metric("gguf_appliance_ready") == 1


def test_request_id_is_returned_and_kept(server: RunningServer) -> None:
    mine = httpx.get(server.url("/health/live"), headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    made = httpx.get(server.url("/health/live"))
    assert len(made.headers["x-request-id"]) == 32


def test_page_is_served_at_the_root(server: RunningServer) -> None:
    page = httpx.get(server.url("/"))
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert 'src="app.js"' in page.text
    script = httpx.get(server.url("/app.js"))
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "/generate" in script.text or '"generate"' in script.text
