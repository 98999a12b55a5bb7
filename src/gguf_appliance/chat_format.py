"""A chat with tools: how the offered tools reach the model, the grammar that holds its answer
to a valid call, and how that answer becomes text and tool calls again, also piece by piece
while it streams.

The bundled model's template (and many small models') knows nothing of tools. For such a
template the node uses a generic form, as llama.cpp's server does: the tools are described in
the system message, and the answer is one JSON object, either `{"tool_calls": [{"name": ...,
"arguments": {...}}]}` or `{"response": "text"}`. A grammar made from the tools' JSON schemas
holds the model to it: with `tool_choice` `required` or a named function only calls (of that
function) can come out; with `auto` the model picks; with `none` the tools are left out.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from .grammar import Constraint


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: `choice` is auto, required, none or a function's name."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def offered(self) -> tuple[Tool, ...]:
        if self.choice == "none":
            return ()
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)


def template_messages(messages: list[dict[str, Any]], use: ToolUse | None) -> list[dict[str, Any]]:
    """The messages as the template gets them, the offered tools described in the system
    message. An earlier turn's calls are written as `name({arguments})` lines and their
    results as one user message (`name returned: ...`): templates that know no tools take
    that, also those that insist user and assistant take turns, and a small model reads it as
    done, where the JSON form of the calls made it call again (measured on SmolLM2-135M)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            lines = [message["content"]] if message.get("content") else []
            for call in message["tool_calls"]:
                names[call.id] = call.name
                lines.append(f"{call.name}({call.arguments})")
            out.append({"role": "assistant", "content": "\n".join(lines)})
        elif role == "tool":
            name = names.get(message.get("tool_call_id") or "", "the tool")
            result = f"{name} returned: {message.get('content') or ''}"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            kept = {k: message[k] for k in ("name",) if k in message}
            out.append({"role": role, "content": message.get("content") or "", **kept})
    for message in out:
        message.pop("tool_results", None)
    if use is None or not use.offered:
        return out
    described = [
        {
            "name": t.name,
            **({"description": t.description} if t.description else {}),
            "parameters": t.parameters or {"type": "object"},
        }
        for t in use.offered
    ]
    answer = (
        'Answer with one JSON object: {"tool_calls": [{"name": NAME, "arguments": {...}}]} to '
        "call tools"
    )
    if use.choice == "auto":
        answer += (
            ', or {"response": TEXT} to answer the user. Call a tool only for a result you do '
            "not have yet; once the results you need are in the conversation, answer the user "
            "with them"
        )
    instructions = f"You can call these tools:\n{_dumps(described)}\n{answer}."
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instructions}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out


def tool_constraint(use: ToolUse) -> Constraint | None:
    """The JSON schema the answer must match (None: no tool is offered, the answer is free)."""
    offered = use.offered
    if not offered:
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.name},
                "arguments": t.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in offered
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not use.parallel:
        array["maxItems"] = 1
    call_form = {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
    }
    if use.choice != "auto":
        return Constraint.json_schema(call_form, field="tools")
    answer_form = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
    }
    return Constraint.json_schema({"anyOf": [call_form, answer_form]}, field="tools")


@dataclass
class Reading:
    """What the answer holds so far: text, and calls (a name; arguments as far as written)."""

    text: str = ""
    calls: list[tuple[str | None, str, bool]] = field(default_factory=list)  # name, args, done


class GenericAnswer:
    """Reads the generic JSON answer as it grows; `feed` returns what is new since the last
    call: text, and per call its name (once) and the next piece of its arguments."""

    def __init__(self) -> None:
        self.raw = ""
        self._sent = Reading()
        self.ids: list[str] = []

    def feed(self, piece: str) -> tuple[str, list[tuple[int, str | None, str]]]:
        self.raw += piece
        now = _read(self.raw)
        text = now.text[len(self._sent.text) :]
        deltas: list[tuple[int, str | None, str]] = []
        for i, (name, args, _) in enumerate(now.calls):
            if name is None:
                break
            if i >= len(self._sent.calls):
                self.ids.append(new_call_id())
                deltas.append((i, name, args))
            else:
                sent_args = self._sent.calls[i][1]
                if len(args) > len(sent_args):
                    deltas.append((i, None, args[len(sent_args) :]))
        self._sent = Reading(now.text, [c for c in now.calls if c[0] is not None])
        return text, deltas

    def result(self) -> tuple[str | None, list[ToolCall]]:
        """The whole answer: its text (None when it is calls) and its calls."""
        reading = _read(self.raw)
        while len(self.ids) < len(reading.calls):
            self.ids.append(new_call_id())
        calls = [
            ToolCall(self.ids[i], name, args)
            for i, (name, args, _) in enumerate(reading.calls)
            if name is not None
        ]
        if calls:
            return None, calls
        return reading.text, []


def _read(raw: str) -> Reading:
    """Parse as much of the generic answer as has been written (the grammar made it valid)."""
    reading = Reading()
    scan = _Scanner(raw)
    if not scan.take("{"):
        return reading
    key = scan.string()
    if key is None or not scan.take(":"):
        return reading
    if key == "response":
        reading.text = scan.string_prefix()
        return reading
    if key != "tool_calls" or not scan.take("["):
        return reading
    while True:
        if not scan.take("{"):
            return reading
        name: str | None = None
        args, done = "", False
        while True:
            member = scan.string()
            if member is None or not scan.take(":"):
                break
            if member == "name":
                name = scan.string()
            else:
                scan.skip_space()
                start = scan.pos
                done = scan.skip_value()
                if member == "arguments":
                    args = raw[start : scan.pos].rstrip(" \t\r\n") if done else raw[start:]
                if not done:
                    break
            if not scan.take(","):
                break
        reading.calls.append((name, args, done))
        if not (done and scan.take("}") and scan.take(",")):
            return reading


class _Scanner:
    """Just enough JSON to walk a possibly unfinished document."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        self._ws()

    def _ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def take(self, char: str) -> bool:
        self._ws()
        if self.text.startswith(char, self.pos):
            self.pos += 1
            return True
        return False

    def string(self) -> str | None:
        """A whole string, or None (and the position left) if it is not all there yet."""
        start = self.pos
        self._ws()
        if not self.text.startswith('"', self.pos):
            self.pos = start
            return None
        end = self._string_end(self.pos + 1)
        if end < 0:
            self.pos = start
            return None
        value: str = json.loads(self.text[self.pos : end + 1], strict=False)
        self.pos = end + 1
        return value

    def string_prefix(self) -> str:
        """The decoded text of a string as far as it goes (an unfinished escape held back)."""
        self._ws()
        if not self.text.startswith('"', self.pos):
            return ""
        end = self._string_end(self.pos + 1)
        if end >= 0:
            return str(json.loads(self.text[self.pos : end + 1], strict=False))
        body = self.text[self.pos + 1 :]
        cut = body.rfind("\\")
        if cut >= 0 and not _escape_complete(body[cut:]):
            body = body[:cut]
        try:
            return str(json.loads('"' + body + '"', strict=False))
        except ValueError:
            return ""

    def _string_end(self, i: int) -> int:
        text = self.text
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i
            i += 1
        return -1

    def skip_value(self) -> bool:
        """Move past one value; False if the text ends inside it."""
        self._ws()
        text, depth = self.text, 0
        i = self.pos
        while i < len(text):
            c = text[i]
            if c == '"':
                end = self._string_end(i + 1)
                if end < 0:
                    self.pos = len(text)
                    return False
                i = end + 1
                if depth == 0:
                    self.pos = i
                    return True
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                if depth == 0:  # the end of the enclosing object: the value was a literal
                    self.pos = i
                    return True
                depth -= 1
                if depth == 0:
                    self.pos = i + 1
                    return True
            elif c == "," and depth == 0:
                self.pos = i
                return True
            i += 1
        self.pos = len(text)
        return False


def _escape_complete(tail: str) -> bool:
    if len(tail) < 2:
        return False
    if tail[1] == "u":
        return len(tail) >= 6
    return True


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
