"""POST /v1/completions: OpenAI's text completion of a raw prompt, streamed or whole.

The prompt is a text, a list of texts, a list of token ids, or a list of those: each prompt
gets `n` choices, prompt i's at index i*n to i*n+n-1. With `echo` each choice's prompt comes
back before its completion; with `logprobs` each token's log probability in OpenAI's legacy
shape (the prompt's tokens first, when echoed).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Engine, TokenEvent
from ..errors import InvalidRequest
from ..settings import Settings
from .endpoint import collect, read_body, start, stream
from .models import check_model
from .openai import Choices, LegacyLogprobs, chunks, finish_reason, header, usage
from .schemas import CompletionRequest


async def completions(request: Request) -> Response:
    body = await read_body(request, CompletionRequest)
    check_model(request, body.model)
    settings: Settings = request.app.state.settings
    prompts = body.prompts
    if len(prompts) > settings.n_slots:
        raise InvalidRequest(
            f"the prompt is a list of {len(prompts)}; this node takes at most "
            f"{settings.n_slots} prompts a request (its slots)",
            param="prompt",
        )
    if len(prompts) * body.n > settings.n_slots:
        raise InvalidRequest(
            f"{len(prompts)} prompts of n {body.n} choices make {len(prompts) * body.n}; "
            f"this node makes at most {settings.n_slots} a request (its slots)",
            param="n",
        )
    texts: list[str] = []  # each prompt's text, as echoed

    def tokenize(engine: Engine) -> tuple[list[int], ...]:
        tokenized = []
        for prompt in prompts:
            if isinstance(prompt, str):
                tokenized.append(engine.tokenize_prompt(prompt))
                texts.append(prompt)
            else:
                engine.check_tokens(prompt)
                tokenized.append(prompt)
                texts.append(engine.detokenize(prompt))
        return tuple(tokenized)

    generation = await start(request, body, tokenize, prompt_field="prompt")
    base = header(request, "cmpl-", "text_completion")
    n = body.n

    def echo(index: int) -> str:
        return texts[index // n] if body.echo else ""

    def offsets(index: int) -> LegacyLogprobs:
        return LegacyLogprobs(len(texts[index // n]))

    wants_logprobs = body.logprobs is not None
    if body.stream:
        echoed: set[int] = set()
        logprobs: dict[int, LegacyLogprobs] = {}

        def chunk(index: int, event: TokenEvent | None, reason: str | None) -> dict[str, Any]:
            text = ""
            if index not in echoed:  # the choice's first chunk: the echoed prompt
                echoed.add(index)
                text = echo(index)
            rendered = None
            if event is not None:
                text += event.text
                if wants_logprobs:
                    if index not in logprobs:
                        logprobs[index] = offsets(index)
                    legacy = logprobs[index]
                    entries = event.logprobs
                    rendered = legacy.prompt(entries) if event.prompt else legacy.answer(entries)
            return {"index": index, "text": text, "logprobs": rendered, "finish_reason": reason}

        return stream(request, generation, chunks(base, chunk, body.include_usage))
    choices = Choices(len(prompts) * n)
    _, done = await collect(request, generation, on_token=choices.add)
    answers = []
    for index, choice in enumerate(choices.items):
        rendered = None
        if wants_logprobs:
            legacy = offsets(index)
            parts = [legacy.prompt(choice.prompt_logprobs)] if body.echo else []
            rendered = LegacyLogprobs.join(*parts, legacy.answer(choice.logprobs))
        answers.append(
            {
                "index": index,
                "text": echo(index) + "".join(choice.text),
                "logprobs": rendered,
                "finish_reason": finish_reason(done, index),
            }
        )
    return JSONResponse({**base, "choices": answers, "usage": usage(done)})
