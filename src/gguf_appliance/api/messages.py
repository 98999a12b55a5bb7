"""POST /v1/messages: Anthropic's Messages API, streamed or whole, with tool use.

The request becomes what /v1/chat/completions makes of OpenAI's: tool_use blocks an assistant
turn's tool calls, tool_result blocks `tool` messages, the tools the generic form and its
grammar (chat_format). The answer is read back into `text` or `tool_use` blocks; streamed, as
Anthropic's events (message_start, content_block_start/delta/stop, message_delta,
message_stop). Errors, also a stream's, are in Anthropic's shape, so its clients raise their
own exception classes. The node's keep-alive stays `: ping` comment lines, which clients skip.

`stop_reason` is end_turn, max_tokens or tool_use, never stop_sequence: the engine's done event
says that a stop string or the model ended the answer, not which, so `stop_sequence` is null.
"""

from __future__ import annotations

import uuid
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat_format import AnswerReader
from ..engine import DoneEvent, Engine, Event, TokenEvent
from ..errors import ApplianceError, InvalidRequest
from . import endpoint
from .anthropic_schemas import MessagesRequest
from .endpoint import collect, event_json, read_body, start, stream
from .models import check_model, model_id
from .sse import frame

PATH = "/v1/messages"

_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    503: "overloaded_error",  # 503, not Anthropic's 529: a balancer retries it elsewhere
}


def error_body(error: ApplianceError) -> dict[str, Any]:
    """An error in Anthropic's shape; the message starts with the field at fault."""
    status = error.status_code
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    message = error.message
    if error.param and not message.startswith(error.param):
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(error: ApplianceError) -> JSONResponse:
    return endpoint.error_response(error, error_body)


class _Object(BaseModel):
    model_config = ConfigDict(extra="allow")


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's path, without pydantic's names for the branches of a union."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p == "str")))


async def _read(request: Request) -> MessagesRequest:
    raw = await read_body(request, _Object)  # JSON only, the size bound: as every route
    try:
        return MessagesRequest.model_validate(raw.model_extra or {})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = [f"{_where(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
        raise InvalidRequest("; ".join(parts), param=_where(errors[0]["loc"]) or None) from None


async def messages(request: Request) -> Response:
    try:
        return await _messages(request)
    except ApplianceError as exc:
        request.state.error = exc.code  # for the request's log line
        return error_response(exc)


async def _messages(request: Request) -> Response:
    body = await _read(request)
    check_model(request, body.model)
    use = body.tool_use()
    tools_on = use is not None and bool(use.offered)
    chat = body.chat_messages()
    counted: list[int] = []

    def tokenize(engine: Engine) -> list[int]:
        tokens = engine.tokenize_chat(chat, use, merge=True)
        counted.append(len(tokens))
        return tokens

    generation = await start(request, body.sampling(), tokenize, prompt_field="messages", tools=use)
    engine: Engine = request.app.state.engine
    message: dict[str, Any] = {
        "id": "msg_" + uuid.uuid4().hex,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model_id(request),
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": counted[0], "output_tokens": 0},
    }
    if body.stream:
        reader = engine.tool_syntax.reader() if tools_on else None
        return stream(request, generation, _Events(message, reader))
    text, done = await collect(request, generation)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    calls = False
    if tools_on:
        answer = engine.tool_syntax.reader()
        answer.feed(text)
        reply, tool_calls = answer.result()
        content = [{"type": "text", "text": reply}] if reply else []
        content += [_tool_use(c.id, c.name, _input(c.arguments)) for c in tool_calls]
        calls = bool(tool_calls)
    usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}
    reason = _stop_reason(done, calls)
    return JSONResponse(
        {
            **message,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": _stop_sequence(done, reason),
            "usage": usage,
        }
    )


def _stop_reason(done: DoneEvent, calls: bool) -> str:
    if done.finish_reason == "stop":
        if calls:
            return "tool_use"
        return "end_turn" if done.stop_sequence is None else "stop_sequence"
    return "max_tokens"


def _stop_sequence(done: DoneEvent, reason: str) -> str | None:
    return done.stop_sequence if reason == "stop_sequence" else None


def _toolu(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_use(call_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": _toolu(call_id), "name": name, "input": tool_input}


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object: as far as they go when max_tokens cut them off (as a
    client reads the streamed pieces)."""
    try:
        value = pydantic_core.from_json(arguments, allow_partial=True)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(data: dict[str, Any]) -> bytes:
    return frame(event_json(data), event=str(data["type"]))


class _Events:
    """Anthropic's events of a streamed answer: message_start first, then a content block per
    piece of the answer (the text; each tool call, its input as JSON text in pieces), then
    message_delta with the stop reason and message_stop; an error as an `error` event."""

    def __init__(self, message: dict[str, Any], answer: AnswerReader | None) -> None:
        self.message = message
        self.answer = answer
        self.started = False
        self.index = -1  # the open block's
        self.open: str | None = None  # its type

    def __call__(self, event: Event) -> bytes:
        out: list[bytes] = []
        if not self.started:
            out.append(_event({"type": "message_start", "message": self.message}))
            self.started = True
        if isinstance(event, TokenEvent):
            self._token(event.text, out)
        elif isinstance(event, DoneEvent):
            if self.answer is not None:
                self._text(self.answer.finish(), out)
            self._close(out)
            calls = self.answer is not None and bool(self.answer.result()[1])
            reason = _stop_reason(event, calls)
            delta = {"stop_reason": reason, "stop_sequence": _stop_sequence(event, reason)}
            usage = {"output_tokens": event.completion_tokens}
            out.append(_event({"type": "message_delta", "delta": delta, "usage": usage}))
            out.append(_event({"type": "message_stop"}))
        else:
            out.append(_event(error_body(event.error)))
        return b"".join(out)

    def _token(self, piece: str, out: list[bytes]) -> None:
        deltas: list[tuple[int, str | None, str]] = []
        if self.answer is None:
            text = piece
        else:
            text, deltas = self.answer.feed(piece)
        self._text(text, out)
        for call, name, arguments in deltas:
            if name is not None:
                assert self.answer is not None
                self._start(_tool_use(self.answer.ids[call], name, {}), out)
            if arguments:
                delta = {"type": "input_json_delta", "partial_json": arguments}
                out.append(
                    _event({"type": "content_block_delta", "index": self.index, "delta": delta})
                )

    def _text(self, text: str, out: list[bytes]) -> None:
        if text:
            if self.open != "text":
                self._start({"type": "text", "text": ""}, out)
            delta = {"type": "text_delta", "text": text}
            out.append(_event({"type": "content_block_delta", "index": self.index, "delta": delta}))

    def _start(self, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self.index += 1
        self.open = str(block["type"])
        out.append(
            _event({"type": "content_block_start", "index": self.index, "content_block": block})
        )

    def _close(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(_event({"type": "content_block_stop", "index": self.index}))
            self.open = None
