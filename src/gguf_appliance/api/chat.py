"""POST /v1/chat/completions: OpenAI's chat completion, streamed or whole, with tool calls."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat_format import AnswerReader, ToolCall
from ..engine import DoneEvent, Engine, Event, TokenEvent
from .endpoint import collect, error_body, event_json, read_body, start, stream
from .models import check_model
from .openai import Choices, chat_choice, chat_logprobs, chunks, finish_reason, header, usage
from .schemas import ChatCompletionRequest
from .sse import frame


async def chat_completions(request: Request) -> Response:
    body = await read_body(request, ChatCompletionRequest)
    check_model(request, body.model)
    use = body.tool_use()
    tools_on = use is not None and bool(use.offered)
    messages = [m.as_chat_message() for m in body.messages]
    generation = await start(
        request,
        body,
        lambda engine: engine.tokenize_chat(messages, use),
        prompt_field="messages",
        tools=use,
    )
    engine: Engine = request.app.state.engine
    base = header(request, "chatcmpl-", "chat.completion.chunk")
    if body.stream:
        if tools_on:
            reader = engine.tool_syntax.reader()
            render = _tool_chunks(reader, base, body.include_usage, bool(body.logprobs))
            return stream(request, generation, render)
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
    choices = Choices(body.n)
    text, done = await collect(request, generation, on_token=choices.add)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reason = finish_reason(done)
    if tools_on:
        answer = engine.tool_syntax.reader()
        answer.feed(text)
        content, calls = answer.result()
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [_call(c) for c in calls]
            reason = "tool_calls" if done.finish_reason == "stop" else reason
    replies = [chat_choice(0, message, reason, choices.items[0], body.logprobs)]
    for index, choice in enumerate(choices.items[1:], start=1):  # n > 1: no tools (a grammar)
        message = {"role": "assistant", "content": "".join(choice.text)}
        reason = finish_reason(done, index)
        replies.append(chat_choice(index, message, reason, choice, body.logprobs))
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": replies,
            "usage": usage(done),
        }
    )


def _call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _tool_chunks(
    answer: AnswerReader, base: dict[str, Any], include_usage: bool, logprobs: bool = False
) -> Any:
    """OpenAI's chunks for an answer read by `answer`: its text as `content` deltas, each call
    as a delta with its id and name, then its arguments in pieces (`logprobs`: each event's
    tokens' in a chunk of their own, with an empty delta)."""
    started = False

    def delta_frame(delta: dict[str, Any], reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return frame(event_json({**base, "choices": [choice]}))

    def render(event: Event) -> bytes:
        nonlocal started
        if isinstance(event, TokenEvent):
            text, deltas = answer.feed(event.text)
            frames = []
            if not started and (text or deltas):
                frames.append(delta_frame({"role": "assistant", "content": None}))
                started = True
            if text:
                frames.append(delta_frame({"content": text}))
            for index, name, arguments in deltas:
                part: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
                if name is not None:
                    part = {
                        "index": index,
                        "id": answer.ids[index],
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                frames.append(delta_frame({"tool_calls": [part]}))
            if logprobs and event.logprobs:
                scored = {"index": 0, "delta": {}, "finish_reason": None}
                scored["logprobs"] = chat_logprobs(event.logprobs)
                frames.append(frame(event_json({**base, "choices": [scored]})))
            return b"".join(frames)
        if isinstance(event, DoneEvent):
            rest = answer.finish()
            frames = []
            if rest:
                delta = {"content": rest} if started else {"role": "assistant", "content": rest}
                frames.append(delta_frame(delta))
            _, calls = answer.result()
            reason = finish_reason(event)
            if calls and event.finish_reason == "stop":
                reason = "tool_calls"
            frames.append(delta_frame({}, reason))
            if include_usage:
                frames.append(frame(event_json({**base, "choices": [], "usage": usage(event)})))
            frames.append(frame("[DONE]"))
            return b"".join(frames)
        return frame(event_json(error_body(event.error)))

    return render
