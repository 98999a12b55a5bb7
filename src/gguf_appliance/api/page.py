"""POST /generate: the chat page's endpoint, streamed as server-sent events.

Events: `token` ({"text"}: the first token's text, then what was decoded in each
STREAM_INTERVAL), then one `done` ({"finish_reason", "prompt_tokens",
"completion_tokens", "time_to_first_token", "tokens_per_second", ...}) or one `error`
({"message", "code", "status"}).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..engine import DoneEvent, Event, TokenEvent
from .endpoint import event_json, read_body, start, stream
from .schemas import GenerateRequest
from .sse import frame


async def generate(request: Request) -> Response:
    body = await read_body(request, GenerateRequest)
    if body.messages is not None:
        messages = [m.as_template_message() for m in body.messages]
        generation = await start(
            request, body, lambda e: e.tokenize_messages(messages), prompt_field="messages"
        )
    else:
        prompt = body.prompt or ""
        generation = await start(
            request, body, lambda e: e.tokenize_prompt(prompt), prompt_field="prompt"
        )
    return stream(request, generation, _render)


def _render(event: Event) -> bytes:
    if isinstance(event, TokenEvent):
        return frame(event_json({"text": event.text}), "token")
    if isinstance(event, DoneEvent):
        return frame(event_json(_done(event)), "done")
    error = event.error
    return frame(
        event_json({"message": error.message, "code": error.code, "status": error.status_code}),
        "error",
    )


def _done(done: DoneEvent) -> dict[str, Any]:
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


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
