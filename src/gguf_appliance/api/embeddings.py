"""POST /v1/embeddings: OpenAI's embeddings, from the node's embedding model (embeddings.py).

The request is checked whole before any work: its shape (pydantic, unknown fields refused), then
every input tokenized (off the event loop) and held to the embedding context and the request's
token budget. Inputs are never cut: one too long is a 400 `context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..embeddings import Embedder, EmbeddingService
from ..engine import Engine
from ..errors import ClientDisconnected, Draining, InvalidRequest, NotFound, NotReady
from ..settings import Settings
from .endpoint import read_body
from .models import model_id

_T = TypeVar("_T")

# OpenAI's own limit of inputs a request: a client that batches up to it works unchanged.
MAX_INPUTS = 2048
MAX_TEXT_CHARS = 1_000_000

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
# No maxItems: a list longer than the embedding context is refused as such (in the route,
# `context_length_exceeded`); the body's size bounds it before that.
TokenList = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. `user` is OpenAI's end-user id for abuse monitoring: accepted and
    not used. Any other field not named here is refused."""

    model_config = ConfigDict(extra="forbid")

    input: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
        | TokenList
        | Annotated[list[TokenList], Field(min_length=1, max_length=MAX_INPUTS)]
    ) = Field(
        description=f"A text, up to {MAX_INPUTS} texts, a list of token ids, or up to "
        f"{MAX_INPUTS} lists of token ids; each at most EMBEDDING_CTX tokens."
    )
    model: str | None = Field(None, max_length=256)
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each vector's little-endian float32 bytes in base64."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Only the model's own size is served (vectors are never cut)."
    )
    user: str | None = Field(
        None, max_length=256, description="Accepted and not used (OpenAI's end-user id)."
    )

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_shape(cls, value: Any, handler: Any) -> Any:
        # One message naming `input`, not one per branch of the union.
        if isinstance(value, list) and len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise PydanticCustomError(
                "too_many_inputs", f"{len(value)} inputs; at most {MAX_INPUTS} a request"
            )
        if value == [] or value == "":
            raise PydanticCustomError("empty_input", "empty; send at least one input")
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            # The error of the branch that matched furthest (deepest location) says most.
            deepest = max(errors, key=lambda e: len(e["loc"]))
            where = ".".join(str(p) for p in deepest["loc"][1:])
            detail = f" ({where}: {deepest['msg']})" if where else f" ({deepest['msg']})"
            raise PydanticCustomError(
                "input_shape",
                "must be a non-empty text, a list of texts, a list of token ids or a list of "
                "lists of token ids{detail}",
                {"detail": detail},
            ) from None

    def token_lists(self, embedder: Embedder) -> list[list[int]]:
        """Every input as tokens (blocking for long texts: run it in a thread)."""
        value = self.input
        if isinstance(value, str):
            return [embedder.tokenize(value)]
        if isinstance(value[0], str):
            return [embedder.tokenize(text) for text in value]
        if isinstance(value[0], int):
            return [value]
        return value


def _service(request: Request) -> EmbeddingService:
    engine: Engine = request.app.state.engine
    settings: Settings = request.app.state.settings
    service: EmbeddingService = request.app.state.embeddings
    if engine.draining:
        raise Draining("the node is shutting down; retry on another node")
    if service.embedder is None:
        raise NotReady(
            engine.load_error or "the model is still loading", retry_after=settings.retry_after
        )
    return service


def _check_model(request: Request, service: EmbeddingService, asked: str | None) -> str:
    """The id answered; any name is served, except one plainly another model's file."""
    served = service.model_id or model_id(request)
    names = {served + ".gguf", model_id(request) + ".gguf"}
    if asked and asked.endswith(".gguf") and asked not in names:
        raise NotFound(f"model {asked!r} is not served here; this node embeds with {served!r}")
    return served


def _encode(vector: Any, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return list(vector.tolist())


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result; if the client goes first, it is cancelled (the embedder stops before
    its next decode) and the request is logged as 499."""
    task = asyncio.ensure_future(work)

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # nothing if it is done
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected("the client closed the connection before the embeddings")
    return task.result()


async def embeddings(request: Request) -> Response:
    body = await read_body(request, EmbeddingRequest)
    service = _service(request)
    served = _check_model(request, service, body.model)
    embedder = service.embedder
    assert embedder is not None
    if body.dimensions is not None and body.dimensions != embedder.n_embd:
        raise InvalidRequest(
            f"dimensions is {body.dimensions}; this model's vectors have {embedder.n_embd} "
            "(send that, or leave dimensions out)",
            param="dimensions",
        )
    inputs = await asyncio.to_thread(body.token_lists, embedder)
    embedder.check(inputs)
    total = sum(map(len, inputs))
    settings: Settings = request.app.state.settings
    if total > settings.embedding_max_tokens:
        raise InvalidRequest(
            f"the inputs have {total} tokens together; this node embeds at most "
            f"{settings.embedding_max_tokens} a request (EMBEDDING_MAX_TOKENS): send fewer "
            "inputs at a time",
            param="input",
        )
    vectors = await _unless_disconnected(request, service.embed(inputs))
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": served,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }
    )
