"""What OpenAI's chat and text completions share: the answer's id and header fields, its
finish reason and usage, and the stream of `data:` chunks that ends with `data: [DONE]`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from ..engine import DoneEvent, Event, TokenEvent
from .endpoint import error_body, event_json
from .models import model_id
from .sse import frame

# A choice's chunk for a piece of text, or (text None) the last one with the finish reason.
Chunk = Callable[[str | None, str | None], dict[str, Any]]


def header(request: Request, prefix: str, kind: str) -> dict[str, Any]:
    return {
        "id": prefix + uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": model_id(request),
    }


def finish_reason(done: DoneEvent) -> str:
    return "stop" if done.finish_reason == "stop" else "length"


def usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def chunks(base: dict[str, Any], chunk: Chunk, include_usage: bool) -> Callable[[Event], bytes]:
    """OpenAI's streaming frames: `data: {chunk}` lines, then `data: [DONE]`."""

    def render(event: Event) -> bytes:
        if isinstance(event, TokenEvent):
            return frame(event_json({**base, "choices": [chunk(event.text, None)]}))
        if isinstance(event, DoneEvent):
            last = {**base, "choices": [chunk(None, finish_reason(event))]}
            frames = [frame(event_json(last))]
            if include_usage:
                frames.append(frame(event_json({**base, "choices": [], "usage": usage(event)})))
            frames.append(frame("[DONE]"))
            return b"".join(frames)
        return frame(event_json(error_body(event.error)))

    return render
