"""Soak: one real node on 127.0.0.1 under mixed clients for a while; nothing may fail or leak.

The clients, all at once: valid requests (streamed and not, /generate and /v1), invalid ones
(bad JSON, JSON nested too deeply, bad fields, a JSON schema too large for a grammar, no key
or a wrong one, a body too large, a prompt too long, unknown paths and methods), slow readers,
and clients that leave at every stage (mid-body, before the answer, mid-stream, while queued).
More of them than the node has slots and queue places, so some get the deliberate 503.

Checks: every answer is the expected one (no 5xx but the deliberate 503 `queue_full`, with
Retry-After; every stream ends with its done event); no error or traceback in the node's log;
after the run no busy slot, no queued job, no more event-loop tasks (+2) or file descriptors
(+4) than after the warm-up, and RSS within --rss-bound-mib of its level after the warm-up.
Exit status 1 if any check fails; the figures go to stdout as JSON (and --json PATH).

    make soak                                         # 5 minutes
    .venv/bin/python benchmarks/soak.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

KEY = "soak-key-" + "s" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
TOPICS = ["dragons", "the sea", "robots", "bread", "the moon", "rivers", "chess", "owls"]
MAX_TOKENS_CAP = 48
MAX_BODY_BYTES = 64 * 1024
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """`gguf-appliance serve` in a child process, its log in a file."""

    def __init__(self, log_path: Path, threads: int | None, n_slots: int, queue_size: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ,
            "GGUF_APPLIANCE_ENV_FILE": "",
            "GGUF_APPLIANCE_HOST": "127.0.0.1",
            "GGUF_APPLIANCE_PORT": str(self.port),
            "GGUF_APPLIANCE_N_SLOTS": str(n_slots),
            "GGUF_APPLIANCE_QUEUE_SIZE": str(queue_size),
            "GGUF_APPLIANCE_N_CTX": "1024",
            "GGUF_APPLIANCE_MAX_TOKENS_CAP": str(MAX_TOKENS_CAP),
            "GGUF_APPLIANCE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "GGUF_APPLIANCE_REQUEST_TIMEOUT": "60",
            "GGUF_APPLIANCE_API_KEYS": KEY,
            "GGUF_APPLIANCE_LOG_FORMAT": "json",
        }
        if threads:
            env["GGUF_APPLIANCE_THREADS"] = str(threads)
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.cli", "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError("the node did not become ready")

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            match = METRIC_LINE.match(line)
            if match:
                samples[match[1] + (match[2] or "")] = float(match[3])
        return samples

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the drain: nothing is in flight by now
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.outcomes[f"{kind}:FAILED"] += 1
        if len(self.failures) < 30:
            self.failures.append(f"{kind}: {detail}")


# --- the clients ---


def chat_body(rng: random.Random, **extra: Any) -> dict[str, Any]:
    topic = rng.choice(TOPICS)
    return {
        "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
        "max_tokens": rng.randint(1, 32),
        **extra,
    }


def check_busy(response: httpx.Response) -> str | None:
    """A 503 must be the deliberate one: queue full, with Retry-After."""
    if response.status_code != 503:
        return None
    code = response.json()["error"]["code"]
    if code != "queue_full" or not response.headers.get("retry-after", "").isdigit():
        return f"503 {code} without Retry-After"
    return "503"


async def stream_generate(client: httpx.AsyncClient, rng: random.Random) -> str:
    async with client.stream("POST", "/generate", json=chat_body(rng), headers=AUTH) as response:
        if response.status_code != 200:
            await response.aread()
            return check_busy(response) or f"unexpected {response.status_code}"
        events = [line async for line in response.aiter_lines() if line.startswith("event:")]
    if not events or events[-1] != "event: done" or "event: error" in events:
        return f"stream ended with {events[-1:]}"
    return "200"


async def chat(client: httpx.AsyncClient, rng: random.Random) -> str:
    response = await client.post("/v1/chat/completions", json=chat_body(rng), headers=AUTH)
    if response.status_code == 200:
        body = response.json()
        if body["choices"][0]["finish_reason"] not in ("stop", "length"):
            return f"finish_reason {body['choices'][0]['finish_reason']}"
        return "200"
    return check_busy(response) or f"unexpected {response.status_code}: {response.text[:200]}"


async def chat_stream(client: httpx.AsyncClient, rng: random.Random) -> str:
    body = chat_body(rng, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        if response.status_code != 200:
            await response.aread()
            return check_busy(response) or f"unexpected {response.status_code}"
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    if lines[-1:] != ["data: [DONE]"] or '"usage"' not in lines[-2]:
        return f"stream ended with {lines[-2:]}"
    return "200"


async def completion(client: httpx.AsyncClient, rng: random.Random) -> str:
    body = {"prompt": f"Facts about {rng.choice(TOPICS)}:", "max_tokens": rng.randint(1, 16)}
    response = await client.post("/v1/completions", json=body, headers=AUTH)
    if response.status_code == 200:
        return "200"
    return check_busy(response) or f"unexpected {response.status_code}"


INVALID: list[tuple[str, str, dict[str, Any], int]] = [
    # (method, path, request arguments, expected status)
    ("POST", "/generate", {"content": b'{"prompt": ', "headers": JSON_AUTH}, 400),
    ("POST", "/generate", {"content": b'{"prompt": "hi"}', "headers": AUTH}, 415),
    # Once the end of every stream on the node (GGML_ABORT): a grammar that allows no token.
    (
        "POST",
        "/generate",
        {"json": {"prompt": "hi", "grammar": 'root ::= "\\x00"'}, "headers": AUTH},
        400,
    ),
    ("POST", "/generate", {"json": {"prompt": "hi", "temperature": 9}, "headers": AUTH}, 400),
    ("POST", "/generate", {"json": {"prompt": "hi", "max_tokens": 10**6}, "headers": AUTH}, 400),
    ("POST", "/generate", {"json": {"prompt": "word " * 1500}, "headers": AUTH}, 400),
    ("POST", "/generate", {"json": {"prompt": "x" * (MAX_BODY_BYTES + 1)}, "headers": AUTH}, 413),
    ("POST", "/generate", {"json": {"prompt": "hi"}}, 401),
    (
        "POST",
        "/generate",
        {"json": {"prompt": "hi"}, "headers": {"Authorization": "Bearer x"}},
        401,
    ),
    ("GET", "/v1/models", {"headers": {"Authorization": "Bearer " + "w" * 32}}, 401),
    ("POST", "/v1/chat/completions", {"json": {"messages": []}, "headers": AUTH}, 400),
    ("POST", "/v1/chat/completions", {"json": {"messages": "hi"}, "headers": AUTH}, 400),
    (
        "POST",
        "/v1/completions",
        {"json": {"prompt": "hi", "model": "other.gguf"}, "headers": AUTH},
        404,
    ),
    ("POST", "/v1/completions", {"json": {"prompt": "hi", "n": 10**6}, "headers": AUTH}, 400),
    ("POST", "/v1/completions", {"json": {"prompt": [10**9]}, "headers": AUTH}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"json": {"messages": [], "logit_bias": {}}, "headers": AUTH},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "json": {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "minLength": 10**8}},
                },
            },
            "headers": AUTH,
        },
        400,
    ),
    ("POST", "/generate", {"content": b"[" * 5000 + b"]" * 5000, "headers": JSON_AUTH}, 400),
    ("GET", "/generate", {"headers": AUTH}, 405),
    ("GET", "/no-such-file", {}, 404),
]


async def invalid(client: httpx.AsyncClient, rng: random.Random) -> str:
    method, path, arguments, expected = rng.choice(INVALID)
    response = await client.request(method, path, **arguments)
    if response.status_code != expected:
        return f"{method} {path}: {response.status_code}, expected {expected}"
    error = response.json().get("error", {})
    if not error.get("message"):
        return f"{method} {path}: no error message"
    return str(expected)


async def probe(client: httpx.AsyncClient, rng: random.Random) -> str:
    path = rng.choice(["/health/live", "/health/ready", "/metrics", "/openapi.json", "/"])
    response = await client.get(path)
    return "200" if response.status_code == 200 else f"unexpected {response.status_code}"


# Raw sockets: what httpx will not do (read slowly, cut a body, reset a connection).


def request_bytes(path: str, body: bytes, length: int | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) if length is None else length}"
        "\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def open_socket(port: int, rcvbuf: int | None = None) -> tuple[Any, Any]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def reset(writer: Any) -> None:
    """Close with a TCP reset, as a crashed client or a dropped network does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def slow_reader(port: int, rng: random.Random) -> str:
    body = json.dumps(chat_body(rng, max_tokens=MAX_TOKENS_CAP, stream=True)).encode()
    reader, writer = await open_socket(port, rcvbuf=2048)
    try:
        writer.write(request_bytes("/v1/chat/completions", body))
        await writer.drain()
        received = b""
        while chunk := await asyncio.wait_for(reader.read(128), 120):
            received += chunk
            await asyncio.sleep(0.03)  # a phone on a bad network
    finally:
        writer.close()
    status = status_of(received)
    if status == 503:
        return "503"
    if status != 200 or b"data: [DONE]" not in received:
        return f"slow read ended with {status}: {received[-200:]!r}"
    return "200"


async def leave_mid_stream(port: int, rng: random.Random) -> str:
    body = json.dumps(chat_body(rng, max_tokens=MAX_TOKENS_CAP)).encode()
    reader, writer = await open_socket(port)
    writer.write(request_bytes("/generate", body))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
    if status_of(head) == 503:
        writer.close()
        return "503"
    with contextlib.suppress(asyncio.IncompleteReadError):  # an answer shorter than planned
        for _ in range(rng.randint(1, 4)):
            await asyncio.wait_for(reader.readuntil(b"event: token"), 120)
    (reset if rng.random() < 0.5 else lambda w: w.close())(writer)
    return "left"


async def leave_mid_body(port: int, rng: random.Random) -> str:
    body = json.dumps(chat_body(rng)).encode()
    _, writer = await open_socket(port)
    writer.write(request_bytes("/generate", body[: len(body) // 2], length=len(body)))
    await writer.drain()
    await asyncio.sleep(rng.random() / 5)
    reset(writer)
    return "left"


async def leave_before_answer(port: int, rng: random.Random) -> str:
    """Sent whole, then gone: queued or generating, unstreamed (the node cancels it)."""
    body = json.dumps(chat_body(rng, max_tokens=MAX_TOKENS_CAP)).encode()
    _, writer = await open_socket(port)
    writer.write(request_bytes("/v1/chat/completions", body))
    await writer.drain()
    await asyncio.sleep(rng.random() / 2)
    writer.close()
    return "left"


ClientKind = Callable[..., Awaitable[str]]
HTTP_KINDS: dict[str, tuple[ClientKind, int]] = {
    "stream_generate": (stream_generate, 20),
    "chat": (chat, 10),
    "chat_stream": (chat_stream, 10),
    "completion": (completion, 5),
    "invalid": (invalid, 16),
    "probe": (probe, 8),
}
SOCKET_KINDS: dict[str, tuple[ClientKind, int]] = {
    "slow_reader": (slow_reader, 7),
    "leave_mid_stream": (leave_mid_stream, 10),
    "leave_mid_body": (leave_mid_body, 4),
    "leave_before_answer": (leave_before_answer, 6),
}
KINDS = {**HTTP_KINDS, **SOCKET_KINDS}
GOOD = {"200", "503", "left", "400", "401", "404", "405", "413", "415"}


async def run_clients(node: Node, clients: int, seconds: float, seed: int, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    names = list(KINDS)
    weights = [KINDS[name][1] for name in names]
    limits = httpx.Limits(max_connections=clients)
    timeout = httpx.Timeout(120, connect=10)
    async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=timeout) as client:

        async def worker(number: int) -> None:
            rng = random.Random(seed * 1000 + number)
            while time.monotonic() < deadline:
                kind = rng.choices(names, weights)[0]
                run, _ = KINDS[kind]
                try:
                    if kind in HTTP_KINDS:
                        outcome = await run(client, rng)
                    else:
                        outcome = await run(node.port, rng)
                except Exception as exc:  # a client error is a finding, never a crash
                    outcome = f"{type(exc).__name__}: {exc}"
                if outcome in GOOD:
                    tally.outcomes[f"{kind}:{outcome}"] += 1
                else:
                    tally.fail(kind, outcome)
                # People pause between requests, and a busy node's Retry-After is heeded
                # (sooner than asked, as impatient clients are).
                await asyncio.sleep(
                    rng.uniform(0.5, 2) if outcome == "503" else rng.uniform(0, 0.2)
                )

        await asyncio.gather(*(worker(n) for n in range(clients)))


# --- the run ---


GAUGES = (
    "process_resident_memory_bytes",
    "process_open_fds",
    "gguf_appliance_event_loop_tasks",
    "gguf_appliance_busy_slots",
    "gguf_appliance_queue_depth",
)


def gauges(node: Node) -> dict[str, float]:
    samples = node.metrics()
    return {name: samples[name] for name in GAUGES}


def wait_idle(node: Node, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        now = gauges(node)
        idle = not now["gguf_appliance_busy_slots"] and not now["gguf_appliance_queue_depth"]
        if idle or time.monotonic() > deadline:
            time.sleep(2)  # let closed connections and finished tasks go
            return gauges(node)
        time.sleep(0.2)


async def sample_rss(node: Node, every: float, until: float, samples: list[float]) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(every)
        with contextlib.suppress(httpx.HTTPError):
            metrics = await asyncio.to_thread(node.metrics)
            samples.append(metrics["process_resident_memory_bytes"])


def soak(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    node = Node(log_dir / "node.log", args.threads, args.slots, args.queue)
    try:
        node.wait_ready()
        tally = Tally()
        asyncio.run(run_clients(node, args.clients, args.warmup, args.seed, tally))
        before = wait_idle(node)
        tokens_before = node.metrics()["gguf_appliance_completion_tokens_total"]
        rss: list[float] = []

        async def main_phase() -> None:
            until = time.monotonic() + args.duration
            await asyncio.gather(
                run_clients(node, args.clients, args.duration, args.seed + 1, tally),
                sample_rss(node, 5, until, rss),
            )

        started = time.monotonic()
        asyncio.run(main_phase())
        elapsed = time.monotonic() - started
        after = wait_idle(node)
        samples = node.metrics()
    finally:
        node.stop()
    log = node.log_path.read_text(errors="replace")
    mib = 2**20
    growth = (
        after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
    ) / mib
    server_5xx = {
        name: value
        for name, value in samples.items()
        if name.startswith("gguf_appliance_requests_total")
        and re.search(r'status="5\d\d"', name)
        and 'status="503"' not in name
    }
    checks = {
        "no unexpected answer": not tally.failures,
        "no 5xx but 503 in the node's counts": not server_5xx,
        "no error or traceback in the node's log": not (
            "Traceback" in log or '"level": "error"' in log or '"level": "critical"' in log
        ),
        "no busy slot": after["gguf_appliance_busy_slots"] == 0,
        "no queued job": after["gguf_appliance_queue_depth"] == 0,
        "event-loop tasks (+2)": after["gguf_appliance_event_loop_tasks"]
        <= before["gguf_appliance_event_loop_tasks"] + 2,
        "file descriptors (+4)": after["process_open_fds"] <= before["process_open_fds"] + 4,
        f"RSS within {args.rss_bound_mib} MiB": abs(growth) <= args.rss_bound_mib,
        "every kind of client ran": all(
            any(key.startswith(kind + ":") for key in tally.outcomes) for kind in KINDS
        ),
    }
    requests = sum(tally.outcomes.values())
    return {
        "command": " ".join(sys.argv),
        "duration_s": round(elapsed, 1),
        "warmup_s": args.warmup,
        "clients": args.clients,
        "slots": args.slots,
        "queue": args.queue,
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "tokens_generated": int(samples["gguf_appliance_completion_tokens_total"] - tokens_before),
        "deliberate_503": sum(v for k, v in tally.outcomes.items() if k.endswith(":503")),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "failures": tally.failures,
        "server_5xx": server_5xx,
        "before": before,
        "after": after,
        "rss_mib": {
            "after_warmup": round(before["process_resident_memory_bytes"] / mib, 1),
            "end": round(after["process_resident_memory_bytes"] / mib, 1),
            "growth": round(growth, 1),
            "min_during": round(min(rss, default=0) / mib, 1),
            "max_during": round(max(rss, default=0) / mib, 1),
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load after warm-up")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of load before baseline")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--slots", type=int, default=4, help="the node's n_slots")
    parser.add_argument("--queue", type=int, default=4, help="the node's queue_size")
    parser.add_argument("--threads", type=int, default=None, help="the node's threads")
    parser.add_argument("--rss-bound-mib", type=float, default=48, help="allowed RSS change")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the node's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-soak-") as scratch:
        log_dir = args.log_dir or Path(scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        report = soak(args, log_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for name, ok in report["checks"].items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
