"""What OpenAI's chat and text completions share: the answer's id and header fields, its
finish reasons and usage, the choices of an unstreamed answer, logprobs in both of OpenAI's
shapes, and the stream of `data:` chunks that ends with `data: [DONE]`."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..engine import DoneEvent, Event, TokenEvent
from ..generation import Logprob
from .endpoint import error_body, event_json
from .models import model_id
from .sse import frame

# A choice's part of a chunk: for a token event of choice `index`, or (event None) the last one
# of that choice, with its finish reason.
Chunk = Callable[[int, TokenEvent | None, str | None], dict[str, Any]]


def header(request: Request, prefix: str, kind: str) -> dict[str, Any]:
    return {
        "id": prefix + uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": model_id(request),
    }


def finish_reason(done: DoneEvent, choice: int = 0) -> str:
    reasons = done.choice_reasons
    reason = reasons[choice] if choice < len(reasons) else done.finish_reason
    return "stop" if reason == "stop" else "length"


def usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def chunks(base: dict[str, Any], chunk: Chunk, include_usage: bool) -> Callable[[Event], bytes]:
    """OpenAI's streaming frames: `data: {chunk}` lines, each of one choice (its `index`), the
    last of each choice with its finish reason, then `data: [DONE]`."""

    def render(event: Event) -> bytes:
        if isinstance(event, TokenEvent):
            return frame(event_json({**base, "choices": [chunk(event.choice, event, None)]}))
        if isinstance(event, DoneEvent):
            frames = [
                frame(event_json({**base, "choices": [chunk(i, None, finish_reason(event, i))]}))
                for i in range(max(len(event.choice_reasons), 1))
            ]
            if include_usage:
                frames.append(frame(event_json({**base, "choices": [], "usage": usage(event)})))
            frames.append(frame("[DONE]"))
            return b"".join(frames)
        return frame(event_json(error_body(event.error)))

    return render


@dataclass
class Choice:
    """What an unstreamed answer gathers of one choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: tuple[Logprob, ...] = ()


class Choices:
    """The choices of an unstreamed answer, from its token events (`add`)."""

    def __init__(self, n: int) -> None:
        self.items = [Choice() for _ in range(n)]

    def add(self, event: TokenEvent) -> None:
        choice = self.items[event.choice]
        if event.prompt:
            choice.prompt_logprobs = event.logprobs
            return
        choice.text.append(event.text)
        choice.logprobs.extend(event.logprobs)


def token_text(piece: bytes) -> str:
    """A token's text: its bytes as UTF-8, a byte that is part of a character as `\\xNN`."""
    return piece.decode("utf-8", "backslashreplace")


def _chat_token(entry: Logprob) -> dict[str, Any]:
    return {"token": token_text(entry.piece), "logprob": entry.logprob, "bytes": list(entry.piece)}


def chat_logprobs(entries: Iterable[Logprob]) -> dict[str, Any]:
    """The chat API's `logprobs` of a choice (or of a chunk's tokens)."""
    return {
        "content": [
            {**_chat_token(e), "top_logprobs": [_chat_token(a) for a in e.top]} for e in entries
        ]
    }


def chat_choice(
    index: int, message: dict[str, Any], reason: str, choice: Choice, logprobs: bool | None
) -> dict[str, Any]:
    """A choice of an unstreamed chat answer (`logprobs`: the request asked for them)."""
    reply = {"index": index, "message": message, "finish_reason": reason}
    if logprobs:
        reply["logprobs"] = chat_logprobs(choice.logprobs)
    return reply


class LegacyLogprobs:
    """The text completion API's `logprobs` of one choice, chunk by chunk: `tokens`,
    `token_logprobs`, `top_logprobs` (the likeliest tokens and the chosen one) and
    `text_offset`, the characters before each token: the prompt's count from 0, the answer's
    from the prompt's end (echoed or not), as OpenAI's do."""

    def __init__(self, answer_start: int) -> None:
        self._answer = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = answer_start

    def prompt(self, entries: Iterable[Logprob]) -> dict[str, Any]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return self._render(entries, decoder, 0)[0]

    def answer(self, entries: Iterable[Logprob]) -> dict[str, Any]:
        rendered, self._offset = self._render(entries, self._answer, self._offset)
        return rendered

    @staticmethod
    def _render(
        entries: Iterable[Logprob], decoder: codecs.IncrementalDecoder, offset: int
    ) -> tuple[dict[str, Any], int]:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for entry in entries:
            text = token_text(entry.piece)
            tokens.append(text)
            value = entry.logprob
            values.append(value)
            offsets.append(offset)
            offset += len(decoder.decode(entry.piece))
            if value is None:
                tops.append(None)
            else:
                top = {token_text(a.piece): a.logprob or 0.0 for a in entry.top}
                top.setdefault(text, value)
                tops.append(top)
        rendered = {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return rendered, offset

    @staticmethod
    def join(*parts: dict[str, Any]) -> dict[str, Any]:
        return {key: [v for part in parts for v in part[key]] for key in parts[0]}
