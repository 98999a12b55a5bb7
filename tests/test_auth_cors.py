from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.keys import ApiKeys, KeyFileError, key_digest, read_key_file

from .conftest import RunningServer, wait_until

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
    # The headers the OpenAI and Anthropic clients send from a browser pass the preflight.
    sdk = "x-api-key, anthropic-version, content-type, x-stainless-os, x-stainless-retry-count"
    response = httpx.options(
        open_node.url("/v1/messages"),
        headers={**preflight, "Access-Control-Request-Headers": sdk},
    )
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    assert all(name in allowed for name in sdk.split(", "))
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
    wait_until(
        lambda: authorized(node, new) == 200, 10, "the new key was never accepted after SIGHUP"
    )
    assert authorized(node, old) == 401
    assert authorized(node, kept) == 200

    # A file that does not parse changes nothing: the keys in force stay.
    key_file.write_text(f"{new}\nshort\n")
    node.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "not reloaded" in node.log(), 10, "the log never said the keys were not reloaded"
    )
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
    assert read_key_file(key_file) == [key_digest("k" * 16)]
    key_file.write_text("k" * 16 + "\nsecret but too short\n")
    with pytest.raises(KeyFileError) as caught:
        read_key_file(key_file)
    assert "line 2" in str(caught.value)
    assert "secret" not in str(caught.value)  # a near-miss key never lands in a log
    keys = ApiKeys(["s" * 16])
    assert keys.required and keys.authorized(b"Bearer " + b"s" * 16)
    assert not ApiKeys().required


def test_a_key_file_line_may_give_the_keys_sha256_instead_of_the_key(tmp_path: Path) -> None:
    key = "d" * 32
    key_file = tmp_path / "keys"
    key_file.write_text(f"sha256:{hashlib.sha256(key.encode()).hexdigest().upper()}\n")
    keys = ApiKeys(key_file=key_file)
    assert keys.authorized(f"Bearer {key}".encode())
    assert not keys.authorized(f"Bearer sha256:{hashlib.sha256(key.encode()).hexdigest()}".encode())
    key_file.write_text("sha256:abc\n")  # not 64 hex digits: a bad line, never a short key
    with pytest.raises(KeyFileError, match="line 1"):
        read_key_file(key_file)


COMMENTS_ONLY = "# the team's keys: none yet\n\n"


def test_a_key_file_with_no_key_is_refused_unless_the_api_is_meant_to_be_open(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "keys"
    for text in ("", COMMENTS_ONLY):
        key_file.write_text(text)
        with pytest.raises(KeyFileError, match="holds no key"):
            ApiKeys(key_file=key_file)
    assert ApiKeys(["s" * 16], key_file).required  # the settings' key is in force
    assert not ApiKeys(key_file=key_file, open_api=True).required


def test_a_reload_never_opens_the_api_unless_it_is_meant_to_be_open(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("r" * 20 + "\n")
    keys = ApiKeys(key_file=key_file)
    for text in ("", COMMENTS_ONLY):
        key_file.write_text(text)
        assert not keys.reload()
        assert keys.required and keys.authorized(b"Bearer " + b"r" * 20)
    key_file.unlink()
    assert not keys.reload()
    assert keys.authorized(b"Bearer " + b"r" * 20)

    key_file.write_text("r" * 20 + "\n")
    open_keys = ApiKeys(key_file=key_file, open_api=True)
    key_file.write_text(COMMENTS_ONLY)
    assert open_keys.reload() and not open_keys.required


def test_an_emptied_key_file_keeps_the_keys_in_force_on_sighup(
    start_server: Any, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY + "\n")
    node = start_server(api_key_file=key_file)
    key_file.write_text(COMMENTS_ONLY)
    node.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in node.log(), 10, "the reload was never refused")
    assert "holds no key" in node.log()
    assert authorized(node, "x" * 24) == 401
    assert httpx.get(node.url("/v1/models")).status_code == 401
    assert authorized(node, KEY) == 200


def test_a_key_file_with_no_key_stops_the_node(start_server: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(COMMENTS_ONLY)
    node = start_server(ready=False, api_key_file=key_file)
    assert node.process.wait(timeout=30) == 2
    assert f"the API key file {key_file} holds no key" in node.log()
    assert "Traceback" not in node.log()


def test_a_node_with_no_key_listens_beyond_loopback_only_if_the_api_is_meant_to_be_open(
    start_server: Any,
) -> None:
    refused = start_server(ready=False, host="0.0.0.0")
    assert refused.process.wait(timeout=30) == 2
    assert "no API key, and the node listens on 0.0.0.0" in refused.log()
    assert "GGUF_APPLIANCE_OPEN_API=true" in refused.log()
    assert "Traceback" not in refused.log()

    keyed = start_server(host="0.0.0.0", api_keys=KEY)
    assert httpx.get(keyed.url("/v1/models")).status_code == 401
    open_node = start_server(host="0.0.0.0", open_api="true")
    assert httpx.get(open_node.url("/v1/models")).status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("localhost:8000", 200),
        ("10.0.0.5", 200),
        ("llm.internal:8000", 200),  # named in ALLOWED_HOSTS
        ("evil.example:8000", 421),  # a page's name re-pointed at the node (DNS rebinding)
        ("evil.example.", 421),
        ("", 421),
    ],
)
def test_an_open_api_answers_only_to_addresses_and_allowed_names(
    rebinding_node: RunningServer, host: str, status: int
) -> None:
    response = httpx.post(
        rebinding_node.url("/v1/completions"),
        json={"prompt": "hi", "max_tokens": 1},
        headers={"host": host},
        timeout=30,
    )
    assert response.status_code == status, response.text
    if status == 421:
        assert response.json()["error"]["param"] == "Host"


@pytest.fixture(scope="module")
def rebinding_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("rebinding") / "server.log"
    node = RunningServer({"GGUF_APPLIANCE_ALLOWED_HOSTS": "llm.internal"}, log)
    node.wait_ready()
    yield node
    node.stop()


def test_with_keys_any_host_name_is_answered(start_server: Any) -> None:
    node = start_server(api_keys="k" * 32)
    response = httpx.post(
        node.url("/v1/completions"),
        json={"prompt": "hi", "max_tokens": 1},
        headers={"host": "llm.example.com", "authorization": "Bearer " + "k" * 32},
        timeout=30,
    )
    assert response.status_code == 200


def test_every_response_of_the_node_itself_carries_the_security_headers(
    server: RunningServer,
) -> None:
    # Without NGINX in front too: the page, the API, an error.
    for response in (
        httpx.get(server.url("/"), timeout=10),
        httpx.get(server.url("/v1/models"), timeout=10),
        httpx.post(server.url("/generate"), content=b"{", timeout=10),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
