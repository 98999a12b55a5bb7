"""A pool on one machine: three real nodes behind the real NGINX with deploy/local-pool.conf.

NGINX stands in for the OCI load balancer (which nothing here can reach); the nodes are
`gguf-appliance serve` processes with the real model on 127.0.0.x. Every client talks to the
pool's address only, except where a test fills one node's slot on purpose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import pytest

from gguf_appliance.settings import Settings

from .conftest import wait_until
from .sse import events

ROOT = Path(__file__).resolve().parents[1]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
T = TypeVar("T")


def load_local_pool() -> ModuleType:
    """deploy/local_pool.py, the runner behind `make pool` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("local_pool", ROOT / "deploy/local_pool.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_pool"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


local_pool = load_local_pool()


def free_address(host: str) -> str:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def wait_for(find: Callable[[], T | None], timeout: float, what: str) -> T:
    """wait_until for a thing, not a truth: the first thing `find()` returns (not None)."""
    found: list[T] = []

    def look() -> bool:
        thing = find()
        if thing is not None:
            found.append(thing)
        return bool(found)

    wait_until(look, timeout, what)
    return found[0]


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start a pool; keyword arguments are settings of node 1 only (GGUF_APPLIANCE_ names)."""
    pools: list[Any] = []

    def start(**node_1_settings: object) -> Any:
        run_dir = tmp_path / f"pool-{len(pools)}"
        run_dir.mkdir()
        addresses = tuple(free_address(f"127.0.0.{21 + i}") for i in range(3))
        # Three nodes share 2 cores: one decoding thread each.
        pool = local_pool.LocalPool(
            run_dir, free_address("127.0.0.1"), addresses, {"threads": "1", "n_ctx": "1024"}
        )
        pool.nodes[0].settings.update({k: str(v) for k, v in node_1_settings.items()})
        pools.append(pool)
        pool.start()
        return pool

    yield start
    for pool in pools:
        for node in pool.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait()
        pool.stop()


@dataclass
class Outcome:
    """One streamed request through the pool, as its client saw it."""

    status: int | None = None
    started_at: float | None = None  # the response began (headers came)
    nodes: str = ""  # X-Pool-Nodes: the nodes NGINX tried, in order
    statuses: str = ""
    tokens: int = 0
    done: bool = False
    cut_at: float | None = None  # the connection broke before the stream's end
    error: str = ""

    @property
    def served_by(self) -> str:
        return self.nodes.split(", ")[-1]


def stream(pool_url: str, max_tokens: int, outcome: Outcome) -> Outcome:
    body = {"messages": STORY, "max_tokens": max_tokens, "temperature": 0.8}
    try:
        with httpx.stream("POST", pool_url + "/generate", json=body, timeout=30) as response:
            outcome.status = response.status_code
            outcome.nodes = response.headers.get("x-pool-nodes", "")
            outcome.statuses = response.headers.get("x-pool-statuses", "")
            outcome.started_at = time.monotonic()
            if response.status_code != 200:
                outcome.error = response.read().decode()
                return outcome
            for event, data in events(response):
                if event == "token":
                    outcome.tokens += 1
                elif event == "done":
                    outcome.done = True
                elif event == "error":
                    outcome.error = str(data)
    except httpx.TransportError as exc:
        outcome.cut_at = time.monotonic()
        outcome.error = repr(exc)
    return outcome


def test_a_killed_node_cuts_only_its_own_streams_and_comes_back(start_pool: Any) -> None:
    pool = start_pool()
    clients, per_client = 6, 3
    outcomes: list[Outcome] = []

    def client() -> None:
        for _ in range(per_client):
            outcome = Outcome()
            outcomes.append(outcome)
            stream(pool.url, 32, outcome)

    with ThreadPoolExecutor(clients) as executor:
        futures = [executor.submit(client) for _ in range(clients)]
        # Mid-run: a stream is early in its answer on some node. That node is killed outright.
        running = wait_for(
            lambda: next((o for o in list(outcomes) if 0 < o.tokens <= 12), None),
            60,
            "a stream under way",
        )
        victim = next(n for n in pool.nodes if n.address == running.served_by)
        killed_at = time.monotonic()
        victim.process.kill()
        victim.process.wait()
        for future in futures:
            future.result(timeout=120)

    assert len(outcomes) == clients * per_client
    # No request was lost: every one got a 200 from some node (one that met the dead node
    # before its answer began was sent on to another)...
    assert all(o.status == 200 for o in outcomes), [(o.status, o.error) for o in outcomes]
    cut = [o for o in outcomes if not o.done]
    # ...and the only answers that did not end with `done` were streaming on the dead node
    # when it died; they broke off (no `done`, a truncated chunked body) within seconds.
    assert running in cut
    for o in cut:
        assert o.served_by == victim.address, o
        assert o.started_at is not None and o.started_at < killed_at, o
        assert o.cut_at is not None and o.cut_at - killed_at < 5, o
        assert "RemoteProtocolError" in o.error, o.error
    after = [o for o in outcomes if o.started_at and o.started_at > killed_at]
    assert after, "no request was made after the kill"
    assert all(o.done and o.served_by != victim.address for o in after)
    # The first new request NGINX sent to the dead node met a refused connection, and went on.
    assert any(o.nodes.startswith(victim.address + ", ") for o in after)

    # Restarted, the node is ready again and the pool sends it requests again (NGINX gives a
    # failed node another try after fail_timeout, 5 s).
    victim.start()
    victim.wait_ready(60)

    def served_by_the_restarted_node() -> bool:
        outcome = stream(pool.url, 4, Outcome())
        assert outcome.done, outcome
        return bool(outcome.served_by == victim.address)

    wait_until(served_by_the_restarted_node, 30, "the restarted node got no request")


def test_a_draining_node_finishes_its_streams_and_the_pool_moves_new_ones(
    start_pool: Any,
) -> None:
    pool = start_pool()
    draining_streams = [Outcome() for _ in range(3)]
    threads = [threading.Thread(target=stream, args=(pool.url, 240, o)) for o in draining_streams]
    for thread in threads:
        thread.start()
    first = wait_for(lambda: next((o for o in draining_streams if o.tokens), None), 60, "tokens")
    node = next(n for n in pool.nodes if n.address == first.served_by)
    node.process.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once (what OCI's health check sees): within 0.3 s.
    wait_until(
        lambda: httpx.get(node.url + "/health/ready").status_code == 503,
        0.3,
        "readiness still not 503 after SIGTERM",
    )
    ready = httpx.get(node.url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"

    # New requests through the pool: the one that meets the draining node (503) goes on to
    # another; none is served by it, none fails.
    moved = []
    for _ in range(10):
        outcome = stream(pool.url, 8, Outcome())
        assert outcome.status == 200 and outcome.done, outcome
        assert outcome.served_by != node.address, outcome
        if node.address in outcome.nodes:
            moved.append(outcome)
            break
    assert moved, "no request met the draining node"
    assert moved[0].statuses.startswith("503"), moved[0]

    for thread in threads:
        thread.join(60)
    on_node = [o for o in draining_streams if o.served_by == node.address]
    assert on_node and all(o.done for o in on_node), on_node  # its streams ran to their end
    assert node.process.wait(timeout=40) == 0
    assert all(o.done for o in draining_streams)


def test_a_full_node_sends_requests_to_the_others(start_pool: Any) -> None:
    pool = start_pool(n_slots=1, queue_size=0)
    full = pool.nodes[0]
    held, release = threading.Event(), threading.Event()

    def hold_the_only_slot() -> None:  # straight to the node, past NGINX
        body = {"messages": STORY, "max_tokens": 1000, "temperature": 0.8}
        with httpx.stream("POST", full.url + "/generate", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    held.set()
                if release.is_set() or line.startswith(("event: done", "event: error")):
                    return

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    try:
        assert held.wait(60)
        moved = []
        for _ in range(10):
            outcome = stream(pool.url, 8, Outcome())
            assert outcome.status == 200 and outcome.done, outcome
            assert outcome.served_by != full.address, outcome
            if full.address in outcome.nodes:
                moved.append(outcome)
                break
        assert moved, "no request met the full node"
        assert moved[0].statuses.startswith("503"), moved[0]
        metrics = httpx.get(full.url + "/metrics").text
        refused = re.search(
            r'gguf_appliance_requests_total\{route="/generate",status="503"\} (\S+)', metrics
        )
        assert refused and float(refused[1]) >= 1
    finally:
        release.set()
        holder.join(60)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (NGINX's workers outlive a killed master)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_make_pool_serves_through_nginx_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    listen = free_address("127.0.0.1")
    nodes = ",".join(free_address(f"127.0.0.{31 + i}") for i in range(3))
    pids: list[int] = []
    script = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy/local_pool.py"), "--listen", listen, "--nodes", nodes],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GGUF_APPLIANCE_THREADS": "1"},
        start_new_session=True,  # if the test fails, its whole process group is ended below
    )
    assert script.stdout is not None
    lines: list[str] = []
    # A daemon: an NGINX worker orphaned by a failed run holds the pipe open, and pytest must
    # still be able to exit.
    reader = threading.Thread(target=lambda: lines.extend(script.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Ctrl-C stops" in line for line in lines) or None, 120, "ready")
        pids += [int(m[1]) for line in lines if (m := re.search(r"pid (\d+)", line))]
        assert len(pids) == 4  # three nodes and NGINX
        outcome = stream(f"http://{listen}", 8, Outcome())
        assert outcome.done and outcome.served_by in nodes.split(","), outcome
        page = httpx.get(f"http://{listen}/")
        assert page.status_code == 200 and 'src="app.js"' in page.text
        script.send_signal(signal.SIGINT)
        assert script.wait(timeout=60) == 0
    finally:
        if script.poll() is None:
            left = pids + [child for parent in pids for child in children(parent)]
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        reader.join(10)
    assert any("stopping" in line for line in lines)
    for pid in pids:  # the script reaped its nodes and NGINX: none is left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_systemd_stop_timeout_outlasts_the_drain() -> None:
    # systemd SIGKILLs a unit that takes longer than TimeoutStopSec to stop. After SIGTERM the
    # node drains for up to DRAIN_TIMEOUT, then uvicorn closes (up to 5 s) and the model is freed.
    unit = (ROOT / "systemd/gguf-appliance.service").read_text()
    match = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    assert match
    drain = Settings.model_fields["drain_timeout"].default
    assert int(match[1]) >= drain + 10


def test_the_node_stops_before_nginx_so_the_drain_reaches_clients() -> None:
    # A machine shutting down (a reboot, a scaled-in pool node) stops both units. Debian's
    # nginx.service gives NGINX 5 s (TimeoutStopSec=5) and then kills it, which would cut the
    # streams the node is still draining; ordered After=nginx.service, the node stops first.
    unit = (ROOT / "systemd/gguf-appliance.service").read_text()
    after = [
        name
        for line in unit.splitlines()
        if line.startswith("After=")
        for name in line.removeprefix("After=").split()
    ]
    assert "nginx.service" in after
