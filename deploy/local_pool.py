"""A pool on one machine: three `gguf-appliance serve` nodes behind NGINX, shaped like OCI's.

    make pool        # or: .venv/bin/python deploy/local_pool.py [--listen 127.0.0.1:8080]

NGINX, with deploy/local-pool.conf, stands in for the load balancer. The nodes listen on
127.0.0.11-13:8000 and share the CPUs (GGUF_APPLIANCE_THREADS: a third of them each, unless
set).
Open the printed address for the chat page; `kill -9` or `kill -TERM` a node's pid (printed too)
while answers stream to watch the pool carry on. Ctrl-C stops everything: the nodes drain first.
tests/test_pool.py drives the same classes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CONFIG = Path(__file__).resolve().parent / "local-pool.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NODES = ("127.0.0.11:8000", "127.0.0.12:8000", "127.0.0.13:8000")


@dataclass
class Node:
    """One `gguf-appliance serve` process on a fixed address (it keeps it across restarts)."""

    address: str
    log_path: Path
    settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        host, port = self.address.rsplit(":", 1)
        env = {
            **os.environ,
            "GGUF_APPLIANCE_ENV_FILE": "",  # this machine's /etc/gguf-appliance is not ours
            **{f"GGUF_APPLIANCE_{k.upper()}": v for k, v in self.settings.items()},
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gguf_appliance.cli",
                    "serve",
                    "--host",
                    host,
                    "--port",
                    port,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"node {self.address} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.address} not ready in {timeout} s")
            time.sleep(0.1)

    def stop(self, timeout: float = 40) -> None:
        """SIGTERM (the node drains), then SIGKILL if it outlasts `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def render_config(run_dir: Path, listen: str, nodes: list[Node]) -> Path:
    """deploy/local-pool.conf with its placeholders filled in, written into `run_dir`."""
    values = {"RUN_DIR": str(run_dir), "LISTEN": listen}
    values.update({f"NODE_{i}": node.address for i, node in enumerate(nodes, start=1)})
    text = CONFIG.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = re.findall(r"@[A-Z0-9_]+@", text)
    if left:
        raise ValueError(f"{CONFIG.name}: no value for {', '.join(left)} ({len(NODES)} nodes)")
    conf = run_dir / "nginx.conf"
    conf.write_text(text)
    return conf


class LocalPool:
    def __init__(
        self,
        run_dir: Path,
        listen: str = "127.0.0.1:8080",
        addresses: tuple[str, ...] = NODES,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.url = f"http://{listen}"
        self.nodes = [
            Node(address, run_dir / f"node-{i}.log", dict(settings or {}))
            for i, address in enumerate(addresses, start=1)
        ]
        self.conf = render_config(run_dir, listen, self.nodes)
        self.nginx: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> None:
        for node in self.nodes:
            node.start()
        # NGINX's workers may run as another user: they must reach their temporary paths.
        self.run_dir.chmod(0o755)
        with (self.run_dir / "nginx-stderr.log").open("ab") as log:
            self.nginx = subprocess.Popen(
                [NGINX, "-p", str(self.run_dir), "-c", str(self.conf), "-g", "daemon off;"],
                stderr=log,
                # Not in the terminal's process group: Ctrl-C would stop NGINX at once, cutting
                # the streams the nodes are draining. stop() ends it after them.
                start_new_session=True,
            )
        for node in self.nodes:
            node.wait_ready(timeout)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(self.url + "/health/live", timeout=2)
                return
            except httpx.TransportError:
                if self.nginx.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start; see {self.run_dir}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()  # all drain at once
        for node in self.nodes:
            node.stop()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            self.nginx.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="NGINX's address")
    parser.add_argument("--nodes", default=",".join(NODES), help="three node addresses")
    args = parser.parse_args(argv)
    # Ctrl-C must reach this even when started with SIGINT ignored or blocked: both pass on
    # through fork and exec, and Python keeps an ignored SIGINT ignored. A non-interactive shell
    # ignores SIGINT in what it starts with `&` (seen: a test run started so never stopped).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    addresses = tuple(args.nodes.split(","))
    threads = os.environ.get("GGUF_APPLIANCE_THREADS") or str(
        max(1, (os.cpu_count() or 1) // len(addresses))
    )
    with tempfile.TemporaryDirectory(prefix="gguf-appliance-pool-") as tmp:
        pool = LocalPool(Path(tmp), args.listen, addresses, {"threads": threads})
        try:
            pool.start()
            print(f"pool ready: {pool.url}/  (NGINX; logs in {tmp})", flush=True)
            for node in pool.nodes:
                assert node.process is not None
                print(f"  node {node.url}  pid {node.process.pid}", flush=True)
            assert pool.nginx is not None
            print(f"  nginx pid {pool.nginx.pid}", flush=True)
            print("Ctrl-C stops the pool.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nstopping: the nodes drain their streams first", flush=True)
        finally:
            # Ctrl-C reached the nodes too (they share the terminal); SIGTERM them all the same.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            pool.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
