"""Where a batch job's model calls go: the engine in this process, or a node's OpenAI API.

Both answer `complete(messages, ...)` with a `Completion` and `embed(text)` with an `Embedded`
(in process through an `Embedder`, over HTTP through /v1/embeddings). The HTTP backend retries with
backoff on 429, 502, 503, 504 and lost connections, honouring Retry-After; a wrong key or URL
(401, 403, 404) ends the job, since every row would fail the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np

from .embeddings import Embedder
from .engine import DoneEvent, Engine, ErrorEvent, GenerationParams, TokenEvent
from .errors import ApplianceError, InvalidRequest, PromptTooLong, Unavailable
from .grammar import Constraint
from .llama import SamplingParams


class RowFailed(Exception):
    """This row cannot be done; its line says why and the job goes on."""


class ContextExceeded(RowFailed):
    """The prompt does not fit the node's context (summarize splits the text further)."""


class JobFailed(ApplianceError):
    """Every row would fail the same way (a wrong key, a wrong URL): stop the job."""

    code = "batch_failed"


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Embedded:
    vector: list[float]
    prompt_tokens: int


class Backend(Protocol):
    retries: int

    async def embed(self, text: str) -> Embedded: ...

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        constraint: Constraint | None = None,
    ) -> Completion: ...


class EngineBackend:
    """The engine in this process; waits for room when its queue is full. An embed job loads
    only an embedder (`engine` None)."""

    def __init__(
        self, engine: Engine | None, timeout: float, embedder: Embedder | None = None
    ) -> None:
        self.engine = engine
        self.embedder = embedder
        self.timeout = timeout
        self.retries = 0

    async def embed(self, text: str) -> Embedded:
        embedder = self.embedder
        if embedder is None:
            raise JobFailed("this job loaded no embedding model")
        try:
            tokens = await asyncio.to_thread(embedder.tokenize, text)
            vectors = await asyncio.to_thread(embedder.embed, [tokens])
        except InvalidRequest as exc:
            raise RowFailed(exc.message) from None
        return Embedded(vectors[0].tolist(), len(tokens))

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        constraint: Constraint | None = None,
    ) -> Completion:
        engine = self.engine
        if engine is None:
            raise JobFailed("this job loaded no chat model")
        try:
            prompt = engine.tokenize_messages(messages)
        except InvalidRequest as exc:
            raise RowFailed(exc.message) from None
        params = GenerationParams(
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature, grammar=constraint),
        )
        while True:
            try:
                generation = engine.submit(prompt, params, timeout=self.timeout)
                break
            except PromptTooLong as exc:
                raise ContextExceeded(exc.message) from None
            except InvalidRequest as exc:
                raise RowFailed(exc.message) from None
            except Unavailable:
                self.retries += 1
                await asyncio.sleep(0.05)
        parts: list[str] = []
        try:
            async for event in generation.events():
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                elif isinstance(event, DoneEvent):
                    if event.finish_reason not in ("stop", "length"):
                        raise RowFailed(f"generation ended: {event.finish_reason}")
                    return Completion(
                        "".join(parts),
                        event.prompt_tokens,
                        event.completion_tokens,
                        event.finish_reason,
                    )
                elif isinstance(event, ErrorEvent):
                    raise RowFailed(event.error.message)
        finally:
            generation.cancel()  # a no-op once done; frees the slot if this task is cancelled
        raise RowFailed("the generation ended without a result")


class HttpBackend:
    """A node or load balancer's OpenAI-compatible API, retried when it is busy or away."""

    RETRY_STATUS = frozenset({429, 502, 503, 504})

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str = "default",
        retries: int = 8,
        timeout: float = 600.0,
        max_connections: int = 16,
        backoff: float = 0.5,
    ) -> None:
        # A batch job is batch traffic, keyed or not: interactive requests go first.
        headers = {"X-Traffic-Class": "batch"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections),
        )
        self.model = model
        self.max_retries = retries
        self.backoff = backoff
        self.retries = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            header = response.headers.get("retry-after", "")
            if header.isdigit():
                return min(float(header), 60.0)
        return float(min(30.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.5))

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        constraint: Constraint | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if constraint is not None:
            body.update(_constraint_fields(constraint))
        return _completion(await self._post("/v1/chat/completions", body))

    async def embed(self, text: str) -> Embedded:
        body = {"model": self.model, "input": text, "encoding_format": "base64"}
        response = await self._post("/v1/embeddings", body)
        try:
            data = response.json()
            raw = base64.b64decode(data["data"][0]["embedding"], validate=True)
            vector = np.frombuffer(raw, dtype="<f4").tolist()
            return Embedded(vector, int(data["usage"]["prompt_tokens"]))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RowFailed(f"the node's answer is not an embedding: {exc!r}") from None

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """The 200 answer to POSTing `body`, retried while the node is busy or away."""
        last = ""
        for attempt in range(self.max_retries + 1):
            response = None
            try:
                response = await self.client.post(path, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response
                last = f"HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code not in self.RETRY_STATUS:
                    _raise_for(response, last)
            if attempt < self.max_retries:
                self.retries += 1
                await asyncio.sleep(self._delay(attempt, response))
        raise RowFailed(f"gave up after {self.max_retries} retries: {last}")


def _error_message(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"]["message"])
    return response.text[:200]


def _raise_for(response: httpx.Response, message: str) -> None:
    code = ""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        code = str(response.json()["error"]["code"])
    if code == "context_length_exceeded":
        raise ContextExceeded(message)
    if response.status_code in (401, 403, 404, 405):
        raise JobFailed(f"{response.request.url}: {message}")
    raise RowFailed(message)


def _completion(response: httpx.Response) -> Completion:
    try:
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"]["content"] or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason")),
        )
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RowFailed(f"the node's answer is not a chat completion: {exc!r}") from None


def _constraint_fields(constraint: Constraint) -> dict[str, Any]:
    """A constraint as the fields of a chat completion request."""
    if constraint.kind == "gbnf":
        return {"grammar": constraint.source}  # llama.cpp's extension; gguf-appliance takes it
    if constraint.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    schema = {"name": "row", "schema": constraint.source}
    return {"response_format": {"type": "json_schema", "json_schema": schema}}
