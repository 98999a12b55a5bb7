"""What every endpoint does: read and check the body, start a generation on the engine, stream
or collect its events, and answer an error in the one shape every client reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..chat_format import ToolUse
from ..engine import DoneEvent, Engine, Event, Generation, GenerationParams, TokenEvent
from ..errors import (
    ApplianceError,
    BodyTooLarge,
    ClientDisconnected,
    InvalidPrompt,
    InvalidRequest,
    PromptTooLong,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from ..settings import Settings
from .schemas import Sampling
from .sse import EventStreamResponse

_Body = TypeVar("_Body", bound=BaseModel)


async def read_body(request: Request, model: type[_Body]) -> _Body:
    """The request's JSON body as `model`: refused with 415 unless it is sent as JSON, 413
    past the node's body limit (also when no length is sent), 400 saying what is wrong.

    Only JSON is taken: a page on another site can POST a form or text/plain to a node
    without asking first (no CORS preflight), but not application/json.
    """
    settings: Settings = request.app.state.settings
    limit = settings.max_body_bytes
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"the Content-Type header is {media_type or 'missing'}; send application/json",
            param="Content-Type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before the whole body came: nothing to answer
        raise ClientDisconnected("the client closed the connection mid-body") from None
    return parse_body(b"".join(chunks), model)


def parse_body(body: bytes, model: type[_Body]) -> _Body:
    """Parse a JSON request body into `model`, or raise InvalidRequest saying what is wrong."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # also an integer of over 4,300 digits
        raise InvalidRequest(f"the body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidRequest("the body's JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        raise InvalidRequest(_describe(exc), param=".".join(map(str, first)) or None) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _generation_params(request: Request, body: Sampling) -> GenerationParams:
    """The body's generation parameters, with the node's defaults and policy."""
    settings: Settings = request.app.state.settings
    params = body.generation_params(settings.effective_default_max_tokens)
    constraint = params.sampling.grammar
    if constraint is not None and constraint.kind == "gbnf" and not settings.allow_grammar:
        raise InvalidRequest(
            "this node does not take raw grammars (ALLOW_GRAMMAR is off); use "
            "response_format with a JSON schema",
            param=constraint.field,
        )
    return params


async def start(
    request: Request,
    body: Sampling,
    tokenize: Callable[[Engine], list[int] | tuple[list[int], ...]],
    *,
    prompt_field: str,
    max_tokens_field: str = "max_tokens",
    tools: ToolUse | None = None,
) -> Generation:
    """Tokenize and build the grammar (both off the event loop), then submit on the app's
    engine with the body's parameters. Raises ApplianceError before any response; errors
    about the prompt name `prompt_field`, the body's field that holds it, and those about
    the answer's length `max_tokens_field`. `tokenize` gives a prompt's tokens, or a tuple
    of prompts (one request, `n` choices each). With `tools` offered, the answer is held by
    the grammar of a call in the model's tool-call syntax."""
    engine: Engine = request.app.state.engine
    settings: Settings = request.app.state.settings
    params = _generation_params(request, body)
    try:
        if tools is not None and tools.offered:
            sampling = replace(params.sampling, grammar=engine.tool_syntax.constraint(tools))
            params = replace(params, sampling=sampling)
        engine.check_params(params)
        tokenized = await asyncio.to_thread(tokenize, engine)
        prompts = list(tokenized) if isinstance(tokenized, tuple) else [tokenized]
        limit = settings.max_prompt_tokens
        for prompt in prompts:
            if limit is not None and len(prompt) > limit:
                raise PromptTooLong(
                    f"the prompt has {len(prompt)} tokens; this node takes at most {limit}"
                )
        grammar = None
        if params.sampling.grammar is not None:
            grammar = await engine.prepare_grammar(params.sampling.grammar)
        generation = engine.submit_prompts(
            prompts,
            params,
            timeout=settings.request_timeout,
            grammar=grammar,
            batch=getattr(request.state, "batch", False),  # the auth middleware's class
        )
    except (PromptTooLong, InvalidPrompt) as exc:
        exc.param = prompt_field
        raise
    except InvalidRequest as exc:
        if exc.param == "max_tokens":
            exc.param = max_tokens_field
        raise
    request.state.generation = generation  # for the request's log line
    return generation


async def collect(
    request: Request,
    generation: Generation,
    on_token: Callable[[TokenEvent], None] | None = None,
) -> tuple[str, DoneEvent]:
    """Run a generation to its end for an unstreamed answer; cancel it if the client leaves.

    The text is the first choice's; `on_token` sees every token event (every choice's)."""
    parts: list[str] = []

    async def consume() -> DoneEvent:
        async for event in generation.events():
            if isinstance(event, TokenEvent):
                if event.choice == 0:
                    parts.append(event.text)
                if on_token is not None:
                    on_token(event)
            elif isinstance(event, DoneEvent):
                return event
            else:
                raise event.error
        raise AssertionError("a generation ends with a done or error event")

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            generation.cancel()
            consumer.cancel()
    if consumer.cancelled() or not consumer.done():
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        raise ClientDisconnected("the client closed the connection before the answer")
    return "".join(parts), consumer.result()


def stream(request: Request, generation: Generation, render: Callable[[Event], bytes]) -> Response:
    """The generation as server-sent events, each event rendered by `render`."""
    settings: Settings = request.app.state.settings
    # X-Accel-Buffering: NGINX must pass each event on at once, whatever its site file says.
    return EventStreamResponse(
        generation,
        render,
        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
        ping=settings.ping_interval,
    )


# Characters JSON leaves raw that str.splitlines (and so httpx's iter_lines, which many SSE
# clients use) takes for line ends: escaped, so such a client never sees an event cut in two.
_LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event_json(data: dict[str, Any]) -> str:
    """JSON for an event's data: UTF-8 as it is, except what a line splitter would cut at."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_SEPARATORS)


def error_body(error: ApplianceError) -> dict[str, Any]:
    """Every error, on every route, in OpenAI's shape: `param` names the field at fault."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }


def error_response(
    error: ApplianceError, shape: Callable[[ApplianceError], dict[str, Any]] | None = None
) -> JSONResponse:
    """The error's answer: its status, the body in `shape` (OpenAI's error body by default),
    Retry-After for a 503 that knows when, WWW-Authenticate for a 401."""
    headers = {}
    if isinstance(error, Unavailable) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="gguf-appliance"'
    body = (shape or error_body)(error)
    return JSONResponse(body, status_code=error.status_code, headers=headers)


async def on_appliance_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApplianceError)
    request.state.error = exc.code  # for the request's log line
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 in the same shape, so a client has one format to read."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    error = InvalidRequest(exc.detail)
    error.code = code
    return JSONResponse(error_body(error), status_code=exc.status_code, headers=exc.headers)
