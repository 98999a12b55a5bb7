"""POST /generate: the chat page's endpoint, streamed as server-sent events.

Events: `token` ({"text"}: the first token's text, then what was decoded in each
STREAM_INTERVAL), then one `done` ({"finish_reason", "prompt_tokens",
"completion_tokens", "time_to_first_token", "tokens_per_second", ...}) or one `error`
({"message", "code", "status"}).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .engine import DoneEvent, Engine, Event, Generation, GenerationParams, TokenEvent
from .errors import (
    ApplianceError,
    BodyTooLarge,
    ClientDisconnected,
    PromptTooLong,
    UnsupportedMediaType,
)
from .schemas import GenerateRequest, Sampling, parse_body
from .settings import Settings
from .sse import EventStreamResponse, frame


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (also when no length is sent).

    Only JSON is taken: a page on another site can POST a form or text/plain to a node
    without asking first (no CORS preflight), but not application/json.
    """
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
    return b"".join(chunks)


async def request_params(request: Request, body: Sampling) -> GenerationParams:
    """The body's generation parameters. Grammars and JSON schemas are priced and converted
    here, on a worker thread: that is CPU work the size of the body."""
    settings: Settings = request.app.state.settings
    return await asyncio.to_thread(
        body.generation_params,
        settings.effective_default_max_tokens,
        allow_grammar=settings.allow_grammar,
    )


async def start(
    request: Request, tokenize: Callable[[Engine], list[int]], params: GenerationParams
) -> Generation:
    """Tokenize, build the grammar (both off the event loop) and submit on the app's engine;
    raises ApplianceError before any response."""
    engine: Engine = request.app.state.engine
    settings: Settings = request.app.state.settings
    prompt = await asyncio.to_thread(tokenize, engine)
    limit = settings.max_prompt_tokens
    if limit is not None and len(prompt) > limit:
        raise PromptTooLong(
            f"the prompt has {len(prompt)} tokens; this node takes at most {limit}",
            param="messages",
        )
    grammar = None
    if params.sampling.grammar is not None:
        grammar = await engine.prepare_grammar(
            params.sampling.grammar, params.sampling.grammar_field
        )
    generation = engine.submit(prompt, params, timeout=settings.request_timeout, grammar=grammar)
    request.state.generation = generation  # for the request's log line
    return generation


async def until_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, generation: Generation) -> tuple[str, DoneEvent]:
    """Run a generation to its end for a non-streamed answer; cancel it if the client leaves."""
    parts: list[str] = []

    async def consume() -> DoneEvent:
        async for event in generation.events():
            if isinstance(event, TokenEvent):
                parts.append(event.text)
            elif isinstance(event, DoneEvent):
                return event
            else:
                raise event.error
        raise AssertionError("a generation ends with a done or error event")

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(until_disconnect(request))
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


def sse_response(
    request: Request, generation: Generation, render: Callable[[Event], bytes]
) -> Response:
    # X-Accel-Buffering: NGINX must pass each event on at once, whatever its site file says.
    settings: Settings = request.app.state.settings
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


def _render_event(event: Event) -> bytes:
    if isinstance(event, TokenEvent):
        return frame(event_json({"text": event.text}), "token")
    if isinstance(event, DoneEvent):
        return frame(event_json(done_payload(event)), "done")
    return frame(event_json(error_payload(event.error)), "error")


def done_payload(done: DoneEvent) -> dict[str, Any]:
    return {
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "cached_tokens": done.cached_tokens,
        "completion_tokens": done.completion_tokens,
        "time_to_first_token": _round(done.time_to_first_token),
        "tokens_per_second": _round(done.tokens_per_second, 2),
        "queue_seconds": _round(done.queue_seconds),
        "duration": _round(done.duration),
    }


def error_payload(error: ApplianceError) -> dict[str, Any]:
    return {"message": error.message, "code": error.code, "status": error.status_code}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


async def generate(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = parse_body(await read_body(request, settings.max_body_bytes), GenerateRequest)
    params = await request_params(request, body)
    if body.messages is not None:
        messages = [m.as_template_message() for m in body.messages]
        generation = await start(request, lambda e: e.tokenize_messages(messages), params)
    else:
        prompt = body.prompt or ""
        generation = await start(request, lambda e: e.tokenize_prompt(prompt), params)
    return sse_response(request, generation, _render_event)
