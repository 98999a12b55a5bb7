"""The request log: one line per request with its figures; prompts and answers only on demand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import RunningServer, wait_until
from .sse import events

SECRET = "Zebra-Quokka-7731"  # a prompt marker that cannot appear in the log by accident


def access_lines(node: RunningServer) -> list[dict[str, Any]]:
    entries = []
    for line in node.log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "gguf_appliance.access":
                entries.append(entry)
    return entries


def line_for(node: RunningServer, request_id: str) -> dict[str, Any] | None:
    return next((e for e in access_lines(node) if e["request_id"] == request_id), None)


def wait_for_line(node: RunningServer, request_id: str) -> dict[str, Any]:
    try:
        wait_until(lambda: line_for(node, request_id), 10, f"no log line for {request_id}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {node.log()}") from None
    entry = line_for(node, request_id)
    assert entry is not None
    return entry


def requests_logged(node: RunningServer) -> list[dict[str, Any]]:
    """The access lines of requests the test made (the start's readiness polls left out)."""
    return [e for e in access_lines(node) if e["route"] != "/health/ready"]


def chat(node: RunningServer, request_id: str, content: str) -> str:
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    }
    headers = {"X-Request-ID": request_id}
    with httpx.stream(
        "POST", node.url("/generate"), json=body, headers=headers, timeout=30
    ) as response:
        assert response.headers["x-request-id"] == request_id
        return "".join(data["text"] for event, data in events(response) if event == "token")


def test_one_json_line_per_request_with_its_figures_and_no_prompt(start_server: Any) -> None:
    node = start_server(log_format="json")
    answer = chat(node, "req-figures-1", f"Repeat after me: {SECRET}")
    entry = wait_for_line(node, "req-figures-1")
    logged = len(requests_logged(node))
    assert entry["route"] == "/generate" and entry["method"] == "POST"
    assert entry["status"] == 200
    assert entry["finish_reason"] in ("stop", "length")
    assert 0 < entry["ttft"] <= entry["latency"]
    assert entry["queue_wait"] >= 0
    assert entry["prompt_tokens"] > 5
    assert 1 <= entry["completion_tokens"] <= 12
    httpx.post(node.url("/v1/completions"), json={"prompt": SECRET, "max_tokens": 3}, timeout=30)
    httpx.post(
        node.url("/generate"),
        content=b'{"prompt": "' + SECRET.encode(),  # bad JSON: 400
        headers={"content-type": "application/json"},
    )
    wait_until(
        lambda: len(requests_logged(node)) >= logged + 2, 10, "the last two requests never logged"
    )
    log = node.log_path.read_text()
    assert SECRET not in log
    assert answer.strip() and answer.strip() not in log  # nor the answer
    statuses = [e["status"] for e in requests_logged(node)]
    assert statuses[-3:] == [200, 200, 400]


def test_log_prompts_puts_the_prompt_and_answer_in_the_line(start_server: Any) -> None:
    node = start_server(log_format="json", log_prompts="true")
    answer = chat(node, "req-prompts-1", f"Repeat after me: {SECRET}")
    entry = wait_for_line(node, "req-prompts-1")
    assert entry["prompt"] == [{"role": "user", "content": f"Repeat after me: {SECRET}"}]
    assert entry["output"] == answer


def test_a_client_that_leaves_is_logged_with_what_it_cost(start_server: Any) -> None:
    node = start_server(log_format="text")
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
        "max_tokens": 1500,
    }
    headers = {"X-Request-ID": "req-gone-1"}
    with httpx.stream("POST", node.url("/generate"), json=body, headers=headers) as response:
        for event, _ in events(response):
            if event == "token":
                break  # leaving closes the connection mid-answer
    wait_until(lambda: "request_id=req-gone-1" in node.log(), 10, "req-gone-1 never logged")
    line = next(x for x in node.log().splitlines() if "request_id=req-gone-1" in x)
    assert "finish_reason=cancelled" in line
    assert " prompt_tokens=" in line and " completion_tokens=" in line
    assert "lighthouse" not in node.log()


def test_a_request_id_that_is_not_a_plain_token_is_replaced(server: RunningServer) -> None:
    response = httpx.get(server.url("/health/live"), headers={"X-Request-ID": "a b\tc"})
    assert response.headers["x-request-id"] != "a b\tc"
    assert len(response.headers["x-request-id"]) == 32
    too_long = "x" * 129
    response = httpx.get(server.url("/health/live"), headers={"X-Request-ID": too_long})
    assert response.headers["x-request-id"] != too_long


def test_the_api_key_never_reaches_the_log(start_server: Any) -> None:
    key = "never-logged-" + "k" * 16
    node = start_server(api_keys=key, log_format="json")
    assert httpx.get(node.url("/v1/models"), headers={"Authorization": "Bearer wrong"}).is_error
    assert httpx.get(node.url("/v1/models"), headers={"Authorization": f"Bearer {key}"}).is_success

    def models_lines() -> list[dict[str, Any]]:
        return [e for e in access_lines(node) if e["route"] == "/v1/models"]

    wait_until(lambda: len(models_lines()) >= 2, 10, "the two /v1/models requests never logged")
    lines = models_lines()
    assert [e["status"] for e in lines] == [401, 200]
    assert lines[0]["error"] == "invalid_api_key"
    assert key not in node.log_path.read_text()
    assert "wrong" not in node.log_path.read_text()


def test_under_journald_each_line_carries_its_priority(tmp_path: Path) -> None:
    # systemd's journal stream, as the service sees it: stderr is a stream that $JOURNAL_STREAM
    # names by device and inode. A file stands in for journald's socket.
    out = tmp_path / "stderr"
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from gguf_appliance.logs import configure_logging\n"
        "configure_logging('info', sys.argv[1])\n"
        "log = logging.getLogger('t')\n"
        "log.info('fine', extra={'fields': {'status': 200}})\n"
        "log.error('bad')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('broke')\n"
    )
    for fmt in ("text", "json"):
        with out.open("wb") as stderr:
            subprocess.run([sys.executable, "-c", script, fmt], stderr=stderr, check=True)
        lines = out.read_text().splitlines()
        assert [line[:3] for line in lines] == ["<6>", "<3>", "<3>"], lines
        if fmt == "json":
            assert json.loads(lines[0][3:])["status"] == 200
            assert "ZeroDivisionError" in json.loads(lines[2][3:])["exception"]
        else:
            assert lines[0].endswith("t: fine status=200")
            assert "Traceback" in lines[2]
    # Not under journald: no prefix.
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging; from gguf_appliance.logs import configure_logging; "
            "configure_logging('info', 'json'); logging.getLogger('t').info('x')",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert plain.stderr.startswith("{")


def test_a_client_that_leaves_mid_body_is_a_499_not_a_traceback(server: RunningServer) -> None:
    # Found by the soak: starlette's ClientDisconnect escaped as a 500 with a traceback.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: req-half-body\r\nContent-Length: 100\r\n\r\n"
            b'{"prompt": "hel'
        )
        # The client under test: it stalls mid-body, then leaves. The pause lets the server take
        # the headers and the first bytes and wait for the rest, so the leaving is mid-body; the
        # server shows nothing to wait for while it waits for a body.
        time.sleep(0.2)
    wait_until(lambda: "req-half-body" in server.log(), 10, "req-half-body never logged")
    line = next(x for x in server.log().splitlines() if "req-half-body" in x)
    assert "status=499" in line and "error=client_disconnected" in line
    assert "Traceback" not in server.log()
