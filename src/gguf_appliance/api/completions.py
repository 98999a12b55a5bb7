"""POST /v1/completions: OpenAI's text completion of a raw prompt, streamed or whole.

With `echo` the prompt comes back before its completion; with `logprobs` each token's log
probability in OpenAI's legacy shape (the prompt's tokens first, when echoed).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import TokenEvent
from .endpoint import collect, read_body, start, stream
from .models import check_model
from .openai import Choices, LegacyLogprobs, chunks, finish_reason, header, usage
from .schemas import CompletionRequest


async def completions(request: Request) -> Response:
    body = await read_body(request, CompletionRequest)
    check_model(request, body.model)
    prompt = body.prompt_text
    generation = await start(
        request, body, lambda engine: engine.tokenize_prompt(prompt), prompt_field="prompt"
    )
    base = header(request, "cmpl-", "text_completion")
    echo = prompt if body.echo else ""
    wants_logprobs = body.logprobs is not None
    if body.stream:
        echoed: set[int] = set()
        logprobs: dict[int, LegacyLogprobs] = {}

        def chunk(index: int, event: TokenEvent | None, reason: str | None) -> dict[str, Any]:
            text = ""
            if index not in echoed:  # the choice's first chunk: the echoed prompt
                echoed.add(index)
                text = echo
            rendered = None
            if event is not None:
                text += event.text
                if wants_logprobs:
                    legacy = logprobs.setdefault(index, LegacyLogprobs(len(prompt)))
                    entries = event.logprobs
                    rendered = legacy.prompt(entries) if event.prompt else legacy.answer(entries)
            return {"index": index, "text": text, "logprobs": rendered, "finish_reason": reason}

        return stream(request, generation, chunks(base, chunk, body.include_usage))
    choices = Choices(body.n)
    _, done = await collect(request, generation, on_token=choices.add)
    answers = []
    for index, choice in enumerate(choices.items):
        rendered = None
        if wants_logprobs:
            legacy = LegacyLogprobs(len(prompt))
            parts = [legacy.prompt(choice.prompt_logprobs)] if body.echo else []
            rendered = LegacyLogprobs.join(*parts, legacy.answer(choice.logprobs))
        answers.append(
            {
                "index": index,
                "text": echo + "".join(choice.text),
                "logprobs": rendered,
                "finish_reason": finish_reason(done, index),
            }
        )
    return JSONResponse({**base, "choices": answers, "usage": usage(done)})
