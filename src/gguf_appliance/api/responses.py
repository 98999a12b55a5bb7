"""POST /v1/responses: OpenAI's Responses API, stateless: text and message items in, with
`instructions`, function tools and their `function_call_output` items, a `text.format` JSON
schema; the answer as output items, whole or as the streamed event sequence the client reads.

Nothing is stored: `store: true` and `previous_response_id` are refused with a 400 saying so
(send the conversation's items again instead, as with chat completions)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat_format import Tool, ToolCall, ToolUse
from ..engine import DoneEvent, Engine, Event, TokenEvent
from ..grammar import Constraint
from .endpoint import collect, error_body, event_json, read_body, start, stream
from .models import check_model, model_id
from .schemas import FunctionName, Sampling
from .sse import frame

# --- the request ---


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = Field(None, max_length=0)  # an output_text sent back


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = Field(None, max_length=128)  # an earlier output item sent back
    status: str | None = Field(None, max_length=32)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A call an earlier answer made, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: str = Field(max_length=128)
    name: FunctionName
    arguments: str = Field(max_length=100_000)
    id: str | None = Field(None, max_length=128)
    status: str | None = Field(None, max_length=32)


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=128)
    output: str
    id: str | None = Field(None, max_length=128)
    status: str | None = Field(None, max_length=32)


def _item_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return str(kind or "message")  # an easy input message has no type


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: FunctionName
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="Always in force: arguments match the schema.")


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: FunctionName


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a 'schema'")
        return self


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None


class ResponsesRequest(Sampling):
    """The Responses API's fields; the node's sampling extensions (top_k, min_p, seed, stop,
    penalties) are taken too, as on /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    store: Literal[False] | None = Field(
        None, description="Nothing is stored: send the conversation's items each time."
    )
    previous_response_id: None = Field(
        None, description="Nothing is stored: send the conversation's items each time."
    )
    include: list[str] | None = Field(None, max_length=0, description="Nothing to include.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Returned with the response."
    )
    truncation: Literal["disabled"] | None = None
    user: str | None = Field(None, max_length=256, description="Accepted, not used.")

    @field_validator("tools")
    @classmethod
    def _names_once(cls, tools: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [t.name for t in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("two tools have the same name")
        return tools

    @model_validator(mode="after")
    def _settle(self) -> ResponsesRequest:
        if self.max_output_tokens is not None:
            self.max_tokens = self.max_output_tokens
        names = [t.name for t in self.tools or ()]
        choice = self.tool_choice
        if isinstance(choice, NamedFunction) and choice.name not in names:
            raise ValueError("tool_choice names a function that is not in 'tools'")
        if choice in ("auto", "required") and not names:
            raise ValueError(f"tool_choice '{choice}' needs 'tools'")
        use = self.tool_use()
        fmt = self.text.format if self.text else None
        if use is not None and use.offered and fmt is not None and fmt.type != "text":
            raise ValueError("send tools or a text.format JSON schema, not both")
        return self

    def tool_use(self) -> ToolUse | None:
        if not self.tools:
            return None
        chosen = self.tool_choice or "auto"
        choice = chosen.name if isinstance(chosen, NamedFunction) else chosen
        tools = tuple(Tool(t.name, t.description, t.parameters) for t in self.tools)
        return ToolUse(tools, choice, self.parallel_tool_calls)

    def constraint(self) -> Constraint | None:
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            return Constraint.json_object(field="text.format")
        if fmt is not None and fmt.type == "json_schema":
            return Constraint.json_schema(fmt.schema_, field="text.format")
        return super().constraint()

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                out.append({"role": role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(item.call_id, item.name, item.arguments)
                if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return out


# --- the answer ---


async def responses(request: Request) -> Response:
    body = await read_body(request, ResponsesRequest)
    check_model(request, body.model)
    use = body.tool_use()
    messages = body.messages()
    generation = await start(
        request,
        body,
        lambda engine: engine.tokenize_chat(messages, use),
        prompt_field="input",
        max_tokens_field="max_output_tokens",
        tools=use,
    )
    answer = _Answer(request, body, tools_on=use is not None and bool(use.offered))
    if body.stream:
        return stream(request, generation, answer.events())
    text, done = await collect(request, generation)
    answer.feed(text)
    answer.finish()
    return JSONResponse(answer.response(done))


class _Answer:
    """The response object and its output items, built as the text comes."""

    def __init__(self, request: Request, body: ResponsesRequest, *, tools_on: bool) -> None:
        self.body = body
        self.tools_on = tools_on
        engine: Engine = request.app.state.engine
        self.reader = engine.tool_syntax.reader() if tools_on else None
        self.text = ""
        self.id = "resp_" + uuid.uuid4().hex
        self.message_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_id(request)

    def feed(self, piece: str) -> tuple[str, list[tuple[int, str | None, str]]]:
        if self.reader is None:
            self.text += piece
            return piece, []
        text, calls = self.reader.feed(piece)
        self.text += text
        return text, calls

    def finish(self) -> str:
        """At the end: the text `feed` held back (it might have opened a call)."""
        rest = "" if self.reader is None else self.reader.finish()
        self.text += rest
        return rest

    def calls(self) -> list[ToolCall]:
        return [] if self.reader is None else self.reader.result()[1]

    def _message(self, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": self.text, "annotations": []}
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [part],
        }

    def _call_item(self, index: int, call: ToolCall, status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + call.id.removeprefix("call_"),
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": status,
        }

    def output(self) -> list[dict[str, Any]]:
        """A message with the text (unless the answer is only calls), then the calls."""
        calls = self.calls()
        message = [self._message("completed")] if self.text or not calls else []
        return message + [self._call_item(i, c, "completed") for i, c in enumerate(calls)]

    def response(self, done: DoneEvent | None, status: str | None = None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        incomplete = done is not None and done.finish_reason == "length"
        if status is None:
            status = "incomplete" if incomplete else "completed"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [] if done is None else self.output(),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": None,
            "store": False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": _dump(body.tool_choice) or "auto",
            "tools": [_dump(t) for t in body.tools or ()],
            "truncation": "disabled",
            "usage": None if done is None else _usage(done),
        }

    def events(self) -> Callable[[Event], bytes]:
        """The streamed event sequence: response.created and .in_progress; per output item
        .output_item.added, its deltas, their .done events and .output_item.done; then
        response.completed (or .incomplete)."""
        sequence = 0
        opened_message = False
        opened_calls: list[str] = []  # each call's item id, by index
        arguments: list[str] = []

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            data = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            return frame(event_json(data), kind)

        def message_ref() -> dict[str, Any]:
            return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

        def render(ev: Event) -> bytes:
            nonlocal opened_message
            frames: list[bytes] = []
            if sequence == 0:
                frames.append(
                    event("response.created", response=self.response(None, "in_progress"))
                )
                frames.append(
                    event("response.in_progress", response=self.response(None, "in_progress"))
                )

            def add_text(text: str) -> None:
                nonlocal opened_message
                if text:
                    if not opened_message:
                        opened_message = True
                        item = {**self._message("in_progress"), "content": []}
                        frames.append(
                            event("response.output_item.added", output_index=0, item=item)
                        )
                        part = {"type": "output_text", "text": "", "annotations": []}
                        frames.append(
                            event("response.content_part.added", **message_ref(), part=part)
                        )
                    frames.append(
                        event(
                            "response.output_text.delta", **message_ref(), delta=text, logprobs=[]
                        )
                    )

            if isinstance(ev, TokenEvent):
                text, calls = self.feed(ev.text)
                add_text(text)
                first = 1 if opened_message else 0  # a message before the calls
                for index, name, piece in calls:
                    if name is not None:
                        assert self.reader is not None
                        call = ToolCall(self.reader.ids[index], name, "")
                        item = self._call_item(index, call, "in_progress")
                        opened_calls.append(item["id"])
                        arguments.append("")
                        frames.append(
                            event(
                                "response.output_item.added", output_index=first + index, item=item
                            )
                        )
                    if piece:
                        arguments[index] += piece
                        frames.append(
                            event(
                                "response.function_call_arguments.delta",
                                item_id=opened_calls[index],
                                output_index=first + index,
                                delta=piece,
                            )
                        )
                return b"".join(frames)
            if isinstance(ev, DoneEvent):
                add_text(self.finish())
                first = 1 if opened_message else 0
                if opened_message:
                    part = {"type": "output_text", "text": self.text, "annotations": []}
                    frames.append(
                        event(
                            "response.output_text.done",
                            **message_ref(),
                            text=self.text,
                            logprobs=[],
                        )
                    )
                    frames.append(event("response.content_part.done", **message_ref(), part=part))
                    frames.append(
                        event(
                            "response.output_item.done",
                            output_index=0,
                            item=self._message("completed"),
                        )
                    )
                elif not opened_calls and not self.tools_on:
                    # An empty answer: still one message item, as the whole response has.
                    item = self._message("completed")
                    frames.append(
                        event(
                            "response.output_item.added",
                            output_index=0,
                            item={**item, "content": []},
                        )
                    )
                    frames.append(event("response.output_item.done", output_index=0, item=item))
                for index, call in enumerate(self.calls()):
                    frames.append(
                        event(
                            "response.function_call_arguments.done",
                            item_id=opened_calls[index],
                            output_index=first + index,
                            name=call.name,
                            arguments=call.arguments,
                        )
                    )
                    frames.append(
                        event(
                            "response.output_item.done",
                            output_index=first + index,
                            item=self._call_item(index, call, "completed"),
                        )
                    )
                whole = self.response(ev)
                kind = (
                    "response.incomplete"
                    if whole["status"] == "incomplete"
                    else "response.completed"
                )
                frames.append(event(kind, response=whole))
                return b"".join(frames)
            error = error_body(ev.error)["error"]
            frames.append(
                event("error", code=error["code"], message=error["message"], param=error["param"])
            )
            return b"".join(frames)

        return render


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    return value
