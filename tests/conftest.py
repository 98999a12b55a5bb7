from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gguf_appliance.engine import DoneEvent, Engine, EngineConfig, GenerationParams, TokenEvent
from gguf_appliance.settings import DEFAULT_MODEL
from gguf_appliance.sources import resolve_source


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Return once `condition()` is true; fail saying `what` did not happen in `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:g} s)"
        time.sleep(0.05)


async def wait_for_condition(condition: Callable[[], object], timeout: float, what: str) -> None:
    """wait_until for a test's event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:g} s)"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_process(process: subprocess.Popen[bytes], *signals: signal.Signals) -> int:
    """Send a running child `signals`, wait up to 15 s for it to end (then kill it); its exit
    status."""
    if process.poll() is None:
        for sent in signals:
            process.send_signal(sent)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class RunningServer:
    """`gguf-appliance serve` in a child process on a loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **os.environ,
            "GGUF_APPLIANCE_HOST": "127.0.0.1",
            "GGUF_APPLIANCE_PORT": str(self.port),
            "GGUF_APPLIANCE_ENV_FILE": "",
            **env,
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.cli", "serve"],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def url(self, path: str) -> str:
        return self.base_url + path

    def wait_live(self, timeout: float = 60) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/live", timeout)

    def wait_ready(self, timeout: float = 60, headers: dict[str, str] | None = None) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/ready", timeout, headers)

    def _wait(
        self,
        ok: Callable[[httpx.Response], bool],
        path: str,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        def reached() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            try:
                return ok(httpx.get(self.url(path), timeout=2, headers=headers))
            except httpx.TransportError:
                return False

        try:
            wait_until(reached, timeout, f"{path} not reached")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log()}") from None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def metric(
        self, name: str, default: float | None = None, client: httpx.Client | None = None
    ) -> float:
        """A sample's value from /metrics: `name` with its labels as Prometheus prints them
        (read with `client`, if given, on its kept connection)."""
        text = (client.get if client else httpx.get)(self.url("/metrics"), timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        if default is not None:
            return default
        raise KeyError(name)

    def stop(self) -> None:
        end_process(self.process, signal.SIGINT, signal.SIGINT)
        self._log.close()


@contextlib.contextmanager
def slot_held(node: RunningServer) -> Iterator[None]:
    """While inside, one long streamed answer keeps one of the node's slots busy."""
    started, release = threading.Event(), threading.Event()
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1500,
        "temperature": 0.7,
    }

    def hold() -> None:
        with httpx.stream("POST", node.url("/generate"), json=body, timeout=60) as response:
            for line in response.iter_lines():
                started.set()
                if release.is_set() or line.startswith(("event: done", "event: error")):
                    return  # leaving closes the stream: the server frees the slot

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(30), "the slot-holding stream never started"
        yield
    finally:
        release.set()
        holder.join(30)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return resolve_source(DEFAULT_MODEL)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with settings given as keyword arguments (GGUF_APPLIANCE_ names)."""
    servers: list[RunningServer] = []

    def start(ready: bool = True, **settings: object) -> RunningServer:
        env = {f"GGUF_APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()}
        server = RunningServer(env, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One node shared by the tests that only read from it."""
    log_dir = tmp_path_factory.mktemp("shared-server")
    node = RunningServer({"GGUF_APPLIANCE_N_CTX": "2048"}, log_dir / "server.log")
    node.wait_ready()
    yield node
    node.stop()


def make_engine(model_path: Path, **config: Any) -> Engine:
    """A loaded in-process engine on the real model; `config` overrides EngineConfig fields."""
    defaults: dict[str, Any] = {
        "n_ctx": 1024,
        "n_slots": 1,
        "n_batch": 256,
        "threads": 2,
        "queue_size": 2,
        "max_tokens_cap": 512,
        "retry_after": 3,
        "prefill_chunk": 64,
        "reuse_prefix": True,
        "stream_interval": 0.0,  # every token its own event
    }
    engine = Engine(EngineConfig(**{**defaults, **config}))
    engine.load(model_path)
    return engine


async def collect(
    engine: Engine, prompt: list[int], params: GenerationParams
) -> tuple[str, DoneEvent]:
    """Run one generation to its end: its text and its done event (an error event raises)."""
    parts = []
    async for event in engine.submit(prompt, params, timeout=120).events():
        if isinstance(event, TokenEvent):
            parts.append(event.text)
        elif isinstance(event, DoneEvent):
            return "".join(parts), event
        else:
            raise event.error
    raise AssertionError("no done event")


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    """An in-process engine, one slot (each test runs its own event loop)."""
    eng = make_engine(model_path)
    yield eng
    eng.close()
