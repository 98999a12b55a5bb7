from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.keys import ApiKeys, KeyFileError, read_key_file

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


def authorized(node: Any, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.get(node.url("/v1/models"), headers=headers).status_code


def test_key_file_is_read_again_on_sighup(start_server: Any, tmp_path: Path) -> None:
    old, kept, new = "old-key-" + "a" * 16, "kept-key-" + "b" * 16, "new-key-" + "c" * 16
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"# the team's keys\n{old}\n\n{kept}\n")
    node = start_server(api_key_file=key_file)
    assert authorized(node, old) == 200 and authorized(node, kept) == 200
    assert authorized(node, new) == 401

    key_file.write_text(f"{kept}\n  {new}  \n")
    node.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while authorized(node, new) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert authorized(node, new) == 200
    assert authorized(node, old) == 401
    assert authorized(node, kept) == 200

    # A file that does not parse changes nothing: the keys in force stay.
    key_file.write_text(f"{new}\nshort\n")
    node.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not reloaded" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "line 2: a key is one word of at least 16 characters" in node.log()
    assert authorized(node, kept) == 200 and authorized(node, new) == 200
    assert node.process.poll() is None  # SIGHUP did not end the process


def test_keys_from_the_settings_and_the_file_both_count(start_server: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text("f" * 20 + "\n")
    node = start_server(api_keys=KEY, api_key_file=key_file)
    assert authorized(node, KEY) == 200
    assert authorized(node, "f" * 20) == 200
    assert authorized(node, "f" * 19) == 401  # a key's prefix is no key
    assert authorized(node, "f" * 21) == 401


def test_a_missing_key_file_stops_the_node_with_one_line(start_server: Any, tmp_path: Path) -> None:
    node = start_server(ready=False, api_key_file=tmp_path / "absent")
    assert node.process.wait(timeout=30) == 2
    assert f"gguf-appliance: API key file not found: {tmp_path / 'absent'}" in node.log()
    assert "Traceback" not in node.log()


def test_health_and_metrics_can_require_the_key(start_server: Any) -> None:
    node = start_server(
        ready=False, api_keys=KEY, health_requires_key="true", metrics_requires_key="true"
    )
    node.wait_ready(headers={"Authorization": f"Bearer {KEY}"})
    for path in ("/health/live", "/health/ready", "/metrics", "/v1/models"):
        refused = httpx.get(node.url(path))
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert authorized_on(node, path, KEY) == 200, path
    assert httpx.get(node.url("/")).status_code == 200  # the page itself stays open
    assert httpx.get(node.url("/openapi.json")).status_code == 200


def authorized_on(node: Any, path: str, key: str) -> int:
    return httpx.get(node.url(path), headers={"Authorization": f"Bearer {key}"}).status_code


def test_the_key_is_checked_whatever_the_scheme_spelling(start_server: Any) -> None:
    node = start_server(api_keys=KEY)
    models = node.url("/v1/models")
    assert httpx.get(models, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(models, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(models, headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(models, headers={"Authorization": "Bearer"}).status_code == 401


def test_key_file_lines(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\n\n   \n" + "k" * 16 + "\n  # indented comment\n")
    assert read_key_file(key_file) == ["k" * 16]
    key_file.write_text("k" * 16 + "\nsecret but too short\n")
    with pytest.raises(KeyFileError) as caught:
        read_key_file(key_file)
    assert "line 2" in str(caught.value)
    assert "secret" not in str(caught.value)  # a near-miss key never lands in a log
    keys = ApiKeys(["s" * 16])
    assert keys.required and keys.authorized(b"Bearer " + b"s" * 16)
    assert not ApiKeys().required
