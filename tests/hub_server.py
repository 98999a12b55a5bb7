"""A Hugging-Face-compatible file server on 127.0.0.1, for the fetcher's tests.

It speaks the part of the Hub's protocol that huggingface_hub's downloads use: `resolve` URLs
answered with a redirect to a "CDN" URL and the X-Repo-Commit / X-Linked-Etag / X-Linked-Size
headers, `X-Error-Code` on errors, bearer tokens for private and gated repositories (as the Hub
answers: a token it does not know is 401 "Invalid credentials"; a gated repository is 401
GatedRepo without a token, 403 GatedRepo with one whose account has not been granted access),
and Range requests.
Beside it, plain URLs for the HTTPS source: files, a redirect, 403, HTML and a short body.
No mock of huggingface_hub itself: the library's real code runs against this server.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import wait_until

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_0123456789"


@dataclass
class Blob:
    path: Path
    size: int
    sha256: str


@dataclass
class HubState:
    repos: dict[str, dict[str, Blob]] = field(default_factory=dict)  # repo id -> file -> blob
    private: set[str] = field(default_factory=set)
    gated: set[str] = field(default_factory=set)  # GatedRepo unless TOKEN was granted access
    granted: set[str] = field(default_factory=set)  # gated repositories TOKEN's account may read
    blobs: dict[str, Blob] = field(default_factory=dict)  # sha256 or name -> blob
    cut_once_at: int | None = None  # the next full transfer breaks off after this many bytes
    corrupt_blobs: set[str] = field(default_factory=set)  # served with one byte flipped
    delay_per_chunk: float = 0.0
    # The next this many requests (any route) are answered with fail_status, as a Hub or an
    # Object Storage having a bad minute.
    fail_next: int = 0
    fail_status: int = 503
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    # The Authorization header of each resolve request (None: none), in order.
    authorizations: list[str | None] = field(default_factory=list)

    def add_file(self, repo: str, filename: str, path: Path) -> Blob:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = Blob(path, path.stat().st_size, digest)
        self.repos.setdefault(repo, {})[filename] = blob
        self.blobs[digest] = blob
        self.blobs[path.name] = blob
        return blob


def _error(status: int, code: str, message: str) -> Response:
    return PlainTextResponse(
        message, status_code=status, headers={"X-Error-Code": code, "X-Error-Message": message}
    )


def make_app(state: HubState) -> Starlette:
    async def record(request: Request) -> None:
        state.requests.append((request.method, request.url.path, request.headers.get("range")))

    def failing() -> Response | None:
        if state.fail_next <= 0:
            return None
        state.fail_next -= 1
        return PlainTextResponse("try again later", status_code=state.fail_status)

    async def resolve(request: Request) -> Response:
        await record(request)
        if (failure := failing()) is not None:
            return failure
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        files = state.repos.get(repo)
        authorization = request.headers.get("authorization")
        state.authorizations.append(authorization)
        authorized = authorization == f"Bearer {TOKEN}"
        if authorization is not None and not authorized:
            return PlainTextResponse(
                "Invalid credentials in Authorization header",
                status_code=401,
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        if files is None or (repo in state.private and not authorized):
            return _error(
                401 if repo in state.private else 404, "RepoNotFound", "Repository not found"
            )
        if repo in state.gated and not authorized:
            return _error(401, "GatedRepo", "Access to model is restricted: please log in")
        if repo in state.gated and repo not in state.granted:
            return _error(403, "GatedRepo", "Access to model is restricted, not in the list")
        if request.path_params["revision"] not in ("main", COMMIT):
            return _error(404, "RevisionNotFound", "Invalid rev id")
        blob = files.get(request.path_params["path"])
        if blob is None:
            return _error(404, "EntryNotFound", "Entry not found")
        # The "CDN" must be another host, as on the real Hub (huggingface_hub follows redirects
        # within the Hub itself): the same server under the name localhost.
        location = f"http://localhost:{request.url.port}/cdn/{blob.sha256}"
        return RedirectResponse(
            location,
            status_code=302,
            headers={
                "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(blob.size),
                "ETag": f'"{blob.sha256}"',
            },
        )

    def serve_blob(request: Request, blob: Blob, key: str) -> Response:
        start, end = 0, blob.size - 1
        header = request.headers.get("range")
        if header and header.startswith("bytes="):
            first, _, last = header[6:].partition("-")
            start = int(first)
            end = int(last) if last else end
            if start >= blob.size:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{blob.size}"})
        length = end - start + 1
        cut = None
        if state.cut_once_at is not None and start < state.cut_once_at:
            cut, state.cut_once_at = state.cut_once_at, None
        corrupt = key in state.corrupt_blobs

        async def body() -> AsyncIterator[bytes]:
            sent = start
            with blob.path.open("rb") as f:
                f.seek(start)
                while sent <= end:
                    chunk = f.read(min(1 << 18, end + 1 - sent))
                    middle = blob.size // 2 - sent  # a flipped byte in the tensor data
                    if corrupt and 0 <= middle < len(chunk):
                        chunk = chunk[:middle] + bytes([chunk[middle] ^ 0xFF]) + chunk[middle + 1 :]
                    if cut is not None and sent + len(chunk) > cut:
                        yield chunk[: cut - sent]
                        raise ConnectionAbortedError("transfer cut by the test")
                    yield chunk
                    sent += len(chunk)
                    if state.delay_per_chunk:
                        await asyncio.sleep(state.delay_per_chunk)

        headers = {
            "Content-Length": str(length),
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.sha256}"',
        }
        status = 200
        if header:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return StreamingResponse(
            body(), status_code=status, headers=headers, media_type="application/octet-stream"
        )

    async def cdn(request: Request) -> Response:
        await record(request)
        if (failure := failing()) is not None:
            return failure
        sha = request.path_params["sha"]
        return serve_blob(request, state.blobs[sha], sha)

    async def files(request: Request) -> Response:
        await record(request)
        if (failure := failing()) is not None:
            return failure
        blob = state.blobs.get(request.path_params["name"])
        if blob is None:
            return PlainTextResponse("no such object", status_code=404)
        return serve_blob(request, blob, request.path_params["name"])

    async def redirect(request: Request) -> Response:
        await record(request)
        return RedirectResponse(f"{request.base_url}files/{request.path_params['name']}", 302)

    async def forbidden(request: Request) -> Response:
        await record(request)
        return PlainTextResponse("PAR expired", status_code=403)

    async def html(request: Request) -> Response:
        await record(request)
        return Response("<html><body>Sign in</body></html>", media_type="text/html")

    async def short(request: Request) -> Response:
        # A body that ends early while claiming to be whole: only the GGUF check can tell.
        await record(request)
        blob = state.blobs[request.path_params["name"]]
        half = blob.path.read_bytes()[: blob.size // 2]
        return Response(half, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route(
                "/{owner}/{repo}/resolve/{revision}/{path:path}", resolve, methods=["GET", "HEAD"]
            ),
            Route("/cdn/{sha}", cdn, methods=["GET", "HEAD"]),
            Route("/files/{name}", files, methods=["GET", "HEAD"]),
            Route("/redirect/{name}", redirect, methods=["GET", "HEAD"]),
            Route("/forbidden/{name}", forbidden, methods=["GET", "HEAD"]),
            Route("/html/{name}", html, methods=["GET", "HEAD"]),
            Route("/short/{name}", short, methods=["GET", "HEAD"]),
        ]
    )


class HubServer:
    def __init__(self, state: HubState, port: int) -> None:
        self.state = state
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            make_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> HubServer:
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(),
            10,
            "the hub server never started",
        )
        assert self.server.started, "the hub server's thread ended before it started"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
