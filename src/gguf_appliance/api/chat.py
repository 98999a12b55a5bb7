"""POST /v1/chat/completions: OpenAI's chat completion, streamed or whole."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import TokenEvent
from .endpoint import collect, read_body, start, stream
from .models import check_model
from .openai import Choices, chat_logprobs, chunks, finish_reason, header, usage
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
        started: set[int] = set()

        def chunk(index: int, event: TokenEvent | None, reason: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {} if event is None else {"content": event.text}
            if index not in started and event is not None:
                delta["role"] = "assistant"
                started.add(index)
            choice = {"index": index, "delta": delta, "finish_reason": reason}
            if body.logprobs:
                choice["logprobs"] = None if event is None else chat_logprobs(event.logprobs)
            return choice

        return stream(request, generation, chunks(base, chunk, body.include_usage))
    choices = Choices(1)
    text, done = await collect(request, generation, on_token=choices.add)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reply: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason(done)}
    if body.logprobs:
        reply["logprobs"] = chat_logprobs(choices.items[0].logprobs)
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [reply],
            "usage": usage(done),
        }
    )
