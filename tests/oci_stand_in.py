"""A local HTTP server standing in for an OCI service endpoint (Monitoring's ingestion, Vault's
secrets), and a throwaway OCI config file whose API key the real SDK signs requests with.

What is stood in: the service itself (it answers as the real API's documents say, and checks
only that a request is signed with the throwaway key's id) and instance-principal auth (the
metadata service and its certificates cannot be stood in cleanly, so the node is configured
with oci_auth=config_file). What is real: the `oci` SDK, its signing, its HTTP calls and its
parsing of the answers.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

TENANCY = "ocid1.tenancy.oc1..aaaaaaaastandin"
USER = "ocid1.user.oc1..aaaaaaaastandin"


def throwaway_oci_config(directory: Path) -> tuple[Path, str]:
    """An OCI config file with a fresh RSA key; returns it and the key id requests carry."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    key_path = directory / "oci_api_key.pem"
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.MD5())
    digest.update(der)
    fingerprint = ":".join(f"{b:02x}" for b in digest.finalize())
    config = directory / "oci_config"
    config.write_text(
        f"[DEFAULT]\nuser={USER}\nfingerprint={fingerprint}\ntenancy={TENANCY}\n"
        f"region=eu-frankfurt-1\nkey_file={key_path}\n"
    )
    return config, f"{TENANCY}/{USER}/{fingerprint}"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class StandIn:
    """answer(request) gives (status, JSON body); it may block (a hanging endpoint)."""

    answer: Callable[[Received], tuple[int, Any]]
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Received(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw) if raw else None,
                    time.monotonic(),
                )
                with stand_in.lock:
                    stand_in.received.append(request)
                    stand_in.in_flight += 1
                    stand_in.most_in_flight = max(stand_in.most_in_flight, stand_in.in_flight)
                try:
                    status, body = stand_in.answer(request)
                    data = json.dumps(body).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("opc-request-id", "stand-in")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hanging answer
                finally:
                    with stand_in.lock:
                        stand_in.in_flight -= 1

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def running(answer: Callable[[Received], tuple[int, Any]]) -> Iterator[StandIn]:
    stand_in = StandIn(answer)
    try:
        yield stand_in
    finally:
        stand_in.close()
