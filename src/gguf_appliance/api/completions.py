"""POST /v1/completions: OpenAI's text completion of a raw prompt, streamed or whole."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .endpoint import collect, read_body, start, stream
from .models import check_model
from .openai import chunks, finish_reason, header, usage
from .schemas import CompletionRequest


async def completions(request: Request) -> Response:
    body = await read_body(request, CompletionRequest)
    check_model(request, body.model)
    prompt = body.prompt_text
    generation = await start(
        request, body, lambda engine: engine.tokenize_prompt(prompt), prompt_field="prompt"
    )
    base = header(request, "cmpl-", "text_completion")
    if body.stream:

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        return stream(request, generation, chunks(base, chunk, body.include_usage))
    text, done = await collect(request, generation)
    return JSONResponse(
        {
            **base,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(done)}
            ],
            "usage": usage(done),
        }
    )
