"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .engine import DoneEvent, Engine, Event, TokenEvent
from .errors import ApplianceError, NotFound
from .generate import collect, event_json, read_body, request_params, sse_response, start
from .schemas import ChatCompletionRequest, CompletionRequest, parse_body
from .settings import Settings
from .sse import frame


def model_id(request: Request) -> str:
    return str(request.app.state.model_id)


def _check_model(request: Request, asked: str | None) -> None:
    # Clients must send some model name; any name is served by the one model this node has,
    # except a name that is plainly another model's file.
    if asked and asked.endswith(".gguf") and asked != model_id(request) + ".gguf":
        raise NotFound(
            f"model {asked!r} is not served here; this node serves {model_id(request)!r}"
        )


def finish_reason(done: DoneEvent) -> str:
    return "stop" if done.finish_reason == "stop" else "length"


def usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def openai_error_body(error: ApplianceError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }


def _renderer(base: dict[str, Any], chunk: Any, include_usage: bool) -> Callable[[Event], bytes]:
    """OpenAI's streaming frames: `data: {chunk}` lines, then `data: [DONE]`."""

    def render(event: Event) -> bytes:
        if isinstance(event, TokenEvent):
            return frame(event_json({**base, "choices": [chunk(event.text, None)]}))
        if isinstance(event, DoneEvent):
            frames = [frame(json.dumps({**base, "choices": [chunk(None, finish_reason(event))]}))]
            if include_usage:
                frames.append(frame(json.dumps({**base, "choices": [], "usage": usage(event)})))
            frames.append(frame("[DONE]"))
            return b"".join(frames)
        return frame(json.dumps(openai_error_body(event.error)))

    return render


async def chat_completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = parse_body(await read_body(request, settings.max_body_bytes), ChatCompletionRequest)
    _check_model(request, body.model)
    messages = [m.as_template_message() for m in body.messages]

    def tokenize(engine: Engine) -> list[int]:
        return engine.tokenize_messages(messages)

    generation = await start(request, tokenize, await request_params(request, body))
    base = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id(request),
    }
    if body.stream:
        first = True

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first and text is not None:
                delta["role"] = "assistant"
                first = False
            return {"index": 0, "delta": delta, "finish_reason": reason}

        return sse_response(request, generation, _renderer(base, chunk, body.include_usage))
    text, done = await collect(request, generation)
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason(done),
                }
            ],
            "usage": usage(done),
        }
    )


async def completions(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = parse_body(await read_body(request, settings.max_body_bytes), CompletionRequest)
    _check_model(request, body.model)
    prompt = body.prompt_text
    generation = await start(
        request, lambda engine: engine.tokenize_prompt(prompt), await request_params(request, body)
    )
    base = {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id(request),
    }
    if body.stream:

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        return sse_response(request, generation, _renderer(base, chunk, body.include_usage))
    text, done = await collect(request, generation)
    return JSONResponse(
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason(done),
                }
            ],
            "usage": usage(done),
        }
    )


async def models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    data = []
    if engine.ready:
        data.append(
            {
                "id": model_id(request),
                "object": "model",
                "created": int(request.app.state.started_at),
                "owned_by": "gguf-appliance",
            }
        )
    return JSONResponse({"object": "list", "data": data})
