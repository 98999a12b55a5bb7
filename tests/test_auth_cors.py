from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

KEY = "k" * 24


def test_api_key_required_on_generate_and_v1_but_not_on_health(start_server: Any) -> None:
    node = start_server(api_keys=f"{KEY},{'z' * 20}")
    assert httpx.post(node.url("/generate"), json={"prompt": "hi"}).status_code == 401
    wrong = httpx.get(node.url("/v1/models"), headers={"Authorization": "Bearer " + "x" * 24})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(node.url("/health/ready")).status_code == 200
    assert httpx.get(node.url("/metrics")).status_code == 200
    ok = httpx.post(
        node.url("/generate"),
        json={"prompt": "hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert ok.status_code == 200
    client = openai.OpenAI(base_url=node.url("/v1"), api_key="z" * 20, max_retries=0)
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=node.url("/v1"), api_key="nope", max_retries=0).models.list()


def test_cors_is_off_by_default_and_follows_the_allow_list(start_server: Any) -> None:
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
    closed = start_server()
    response = httpx.options(closed.url("/generate"), headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    open_node = start_server(cors_origins="https://chat.example", api_keys=KEY)
    response = httpx.options(open_node.url("/generate"), headers=preflight)
    assert response.headers["access-control-allow-origin"] == "https://chat.example"
    other = httpx.options(
        open_node.url("/generate"), headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
