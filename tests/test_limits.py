"""The node's own limits: request body, prompt tokens, max_tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from .conftest import RunningServer


def test_a_prompt_over_max_prompt_tokens_gets_400_naming_the_limit(start_server: Any) -> None:
    node = start_server(max_prompt_tokens=40)
    long = httpx.post(node.url("/generate"), json={"prompt": "word " * 60, "max_tokens": 2})
    assert long.status_code == 400
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "this node takes at most 40" in error["message"]
    chat = {"messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 2}
    assert httpx.post(node.url("/v1/chat/completions"), json=chat).status_code == 400
    short = httpx.post(node.url("/generate"), json={"prompt": "word " * 20, "max_tokens": 2})
    assert short.status_code == 200


def test_a_context_smaller_than_the_batch_takes_every_prompt_that_fits(start_server: Any) -> None:
    # llama.cpp takes a batch no larger than the context (320 here, where N_BATCH asks 512) and
    # rounds the context up (to 512): a prompt between the two once reached llama.cpp in one
    # decode larger than its batch, and its assertion ended the process.
    node = start_server(n_ctx=320, n_slots=1)
    for words in (430, 505):
        reply = httpx.post(
            node.url("/generate"), json={"prompt": "hello " * words, "max_tokens": 4}, timeout=120
        )
        assert reply.status_code in (200, 400), reply.text
        assert node.process.poll() is None
    assert httpx.get(node.url("/health/ready")).status_code == 200


def test_max_tokens_above_the_cap_gets_400_naming_the_cap(start_server: Any) -> None:
    node = start_server(max_tokens_cap=64)
    response = httpx.post(node.url("/generate"), json={"prompt": "hi", "max_tokens": 65})
    assert response.status_code == 400
    assert "at most 64" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "max_tokens"


def test_a_body_over_max_body_bytes_gets_413_also_when_sent_in_chunks(start_server: Any) -> None:
    node = start_server(max_body_bytes=4096)
    whole = httpx.post(node.url("/generate"), json={"prompt": "x" * 5000})
    assert whole.status_code == 413
    assert "larger than 4096 bytes" in whole.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(
        node.url("/v1/completions"), content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "request_too_large"


def test_a_json_schema_that_would_make_a_huge_grammar_is_refused_at_once(
    server: RunningServer,
) -> None:
    # Found by hand-fuzzing response_format: minLength 10**8 took 20 s of the event loop (the
    # health checks and the watchdog's pings wait behind it) and 900 MB, for a 200-byte request.
    for schema in (
        {"type": "string", "minLength": 10**8},
        {"type": "array", "maxItems": 10**9, "items": {"type": "integer"}},
        {"type": "object", "properties": {"a": {"type": "array", "minItems": 20_000}}},
    ):
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        }
        started = time.monotonic()
        response = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
        assert response.status_code == 400, schema
        assert response.json()["error"]["param"] == "response_format"
        assert time.monotonic() - started < 5
    assert httpx.get(server.url("/health/live")).status_code == 200


def test_json_nested_too_deeply_gets_400_not_500(server: RunningServer) -> None:
    body = '{"prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = httpx.post(
        server.url("/generate"), content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "nests too deeply" in response.json()["error"]["message"]


def test_with_allow_grammar_off_a_raw_grammar_gets_400_and_a_schema_still_works(
    start_server: Any,
) -> None:
    node = start_server(allow_grammar="false")
    raw = {"prompt": "hi", "max_tokens": 4, "grammar": 'root ::= "yes"'}
    refused = httpx.post(node.url("/v1/completions"), json=raw, timeout=60)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "grammar"
    assert "ALLOW_GRAMMAR" in refused.json()["error"]["message"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {
        "messages": [{"role": "user", "content": "Is water wet? Answer in JSON."}],
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    answer = httpx.post(node.url("/v1/chat/completions"), json=body, timeout=60)
    assert answer.status_code == 200
    assert isinstance(json.loads(answer.json()["choices"][0]["message"]["content"])["ok"], bool)
