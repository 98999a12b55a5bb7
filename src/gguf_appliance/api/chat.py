"""POST /v1/chat/completions: OpenAI's chat completion, streamed or whole."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .endpoint import collect, read_body, start, stream
from .models import check_model
from .openai import chunks, finish_reason, header, usage
from .schemas import ChatCompletionRequest


async def chat_completions(request: Request) -> Response:
    body = await read_body(request, ChatCompletionRequest)
    check_model(request, body.model)
    messages = [m.as_template_message() for m in body.messages]
    generation = await start(
        request, body, lambda engine: engine.tokenize_messages(messages), prompt_field="messages"
    )
    base = header(request, "chatcmpl-", "chat.completion.chunk")
    if body.stream:
        first = True

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first and text is not None:
                delta["role"] = "assistant"
                first = False
            return {"index": 0, "delta": delta, "finish_reason": reason}

        return stream(request, generation, chunks(base, chunk, body.include_usage))
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
