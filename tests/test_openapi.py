"""/openapi.json describes the API as it is: schemathesis fuzzes a real node from the document
and every response must conform to it (status, content type, headers, body; each event of a
stream too), with no 5xx."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from gguf_appliance.api import openapi
from gguf_appliance.api.anthropic_schemas import AnthropicErrorBody

from .conftest import RunningServer

KEY = "fuzz-key-" + "f" * 16
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "event_data_conformance",  # ours: tests/schemathesis_hooks.py
]


def test_schemathesis_finds_no_5xx_and_no_response_off_the_document(
    start_server: Any, tmp_path: Path
) -> None:
    node = start_server(
        api_keys=KEY,
        n_ctx=512,
        n_slots=2,
        # Short answers keep each case fast; a larger max_tokens is refused, as documented.
        max_tokens_cap=8,
        # The same for embeddings: 2,048 inputs of one token each took over 60 s on 2 busy cores.
        embedding_max_tokens=256,
        # One thread: llama.cpp's threads spin-wait on each other, which stalls badly when
        # other suites share the 2 cores.
        threads=1,
        log_format="json",
        ready=False,
    )
    node.wait_ready(headers=AUTH)
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        node.url("/openapi.json"),
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--seed",
        "20261122",
        "--generation-database",
        "none",
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated, result.stdout[-3000:]
    assert int(generated[1]) == int(generated[2]) >= 300
    # The fuzzing reached the model on every generation route, not only the validators.
    routes = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages")
    for route in ("/generate", *routes):
        for status in (200, 400):
            sample = f'gguf_appliance_requests_total{{route="{route}",status="{status}"}}'
            assert node.metric(sample, default=0) > 0, sample
    assert "Traceback" not in node.log_path.read_text()


def test_the_document_names_every_route_and_the_errors_they_return(server: RunningServer) -> None:
    document = httpx.get(server.url("/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/models",
        "/v1/responses",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
    }
    generate = document["paths"]["/generate"]["post"]
    assert {"200", "400", "413", "503"} <= set(generate["responses"])
    assert "security" not in generate  # this node has no keys
    assert "text/event-stream" in generate["responses"]["200"]["content"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} == set(chat)
    request = document["components"]["schemas"]["GenerateRequest"]
    max_tokens = request["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["maximum"] == 2048  # the node's max_tokens_cap


def test_protected_operations_answer_401_as_documented(start_server: Any) -> None:
    node = start_server(api_keys=KEY)
    document = httpx.get(node.url("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    protected = [
        (path, method)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if operation.get("security")
    ]
    assert sorted(protected) == [
        ("/generate", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/embeddings", "post"),
        ("/v1/messages", "post"),
        ("/v1/models", "get"),
        ("/v1/responses", "post"),
    ]
    for path, method in protected:
        response = httpx.request(method, node.url(path), json={})
        assert response.status_code == 401
        shape = AnthropicErrorBody if path == "/v1/messages" else openapi.ErrorBody
        shape.model_validate(response.json(), strict=True)
        assert "WWW-Authenticate" in document["paths"][path][method]["responses"]["401"]["headers"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_non_streamed_answers_have_the_documented_shapes(server: RunningServer) -> None:
    # The non-streamed shapes, through the models the document is made from.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=30)
    openapi.ChatCompletion.model_validate(chat.json(), strict=True)
    completion = httpx.post(
        server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 4}, timeout=30
    )
    openapi.Completion.model_validate(completion.json(), strict=True)
    models = httpx.get(server.url("/v1/models"))
    openapi.ModelList.model_validate(models.json(), strict=True)
    ready = httpx.get(server.url("/health/ready"))
    openapi.Ready.model_validate(ready.json(), strict=True)


def test_a_route_asked_with_another_method_says_which_it_takes(server: RunningServer) -> None:
    # Found by schemathesis: the page's files answered these, with `Allow: GET, HEAD`.
    for method, path, allowed in (
        ("OPTIONS", "/generate", "POST"),
        ("GET", "/generate", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/health/ready", "GET, HEAD"),
    ):
        response = httpx.request(method, server.url(path))
        assert response.status_code == 405, (method, path)
        assert set(response.headers["allow"].split(", ")) == set(allowed.split(", "))
        assert response.json()["error"]["code"] == "method_not_allowed"
    missing = httpx.get(server.url("/no-such-page"))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url("/style.css")).status_code == 200
