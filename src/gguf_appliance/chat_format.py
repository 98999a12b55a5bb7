"""A chat with tools: how the offered tools reach the model, the grammar that holds its answer
to a valid call, and how that answer becomes text and tool calls again, also piece by piece
while it streams.

Each family of chat templates has its own way for a model to call tools; the node finds it in
the template's text (`syntax_of`), as llama.cpp's server does, and gives it the conversation
and tools as the template expects them (Hugging Face's `apply_chat_template(tools=...)`):

- Hermes 2 Pro, Qwen 2.5/3 and the many templates after them: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, one block per call.
- Llama 3.1-3.3: one JSON object, `{"name": ..., "parameters": {...}}`.
- Mistral Nemo and later: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`.
- A template that knows no tools (the bundled model's, and many small models'): a generic form,
  as llama.cpp's server has for these. The tools are described in the system message, and the
  answer is one JSON object, `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or
  `{"response": "text"}`.

A grammar made from the tools' JSON schemas holds the answer to a valid call: with
`tool_choice` `required` or a named function only calls (of that function) can come out; with
`auto` the model may answer in text, and in a native syntax the grammar holds the call from the
moment the model starts one (a lazy grammar, triggered by the syntax's opening); with `none`
the tools are left out.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .grammar import Constraint, Frame


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


def merge_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive plain turns of one role as one (templates that insist on turns taken in
    turn; Anthropic's API takes a user's tool results and text as one message)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        last = out[-1] if out else None
        if (
            last is not None
            and last["role"] == message["role"]
            and message["role"] in ("user", "assistant")
            and not last.get("tool_calls")
            and not message.get("tool_calls")
        ):
            out[-1] = {**last, "content": last["content"] + "\n\n" + message["content"]}
        else:
            out.append(message)
    return out


@dataclass
class Reading:
    """What the answer holds so far: text, and calls (a name; arguments as far as written)."""

    text: str = ""
    calls: list[tuple[str | None, str, bool]] = field(default_factory=list)  # name, args, done


class AnswerReader:
    """Reads an answer as it grows; `feed` returns what is new since the last call: text, and
    per call its name (once) and the next piece of its arguments."""

    def __init__(self, read: Callable[[str, bool], Reading], new_id: Callable[[], str]) -> None:
        self.raw = ""
        self._read = read
        self._new_id = new_id
        self._sent = Reading()
        self.ids: list[str] = []

    def feed(self, piece: str) -> tuple[str, list[tuple[int, str | None, str]]]:
        self.raw += piece
        now = self._read(self.raw, False)
        if not now.text.strip():  # blanks before a call are not text (nor sent as such)
            now.text = ""
        text = now.text[len(self._sent.text) :]
        deltas: list[tuple[int, str | None, str]] = []
        for i, (name, args, _) in enumerate(now.calls):
            if name is None:
                break
            if i >= len(self._sent.calls):
                self.ids.append(self._new_id())
                deltas.append((i, name, args))
            else:
                sent_args = self._sent.calls[i][1]
                if len(args) > len(sent_args):
                    deltas.append((i, None, args[len(sent_args) :]))
        self._sent = Reading(now.text, [c for c in now.calls if c[0] is not None])
        return text, deltas

    def finish(self) -> str:
        """At the answer's end: its text not given by `feed` yet (an end that looked as if it
        might open a call)."""
        text, calls = self.result()
        if calls or text is None:
            return ""
        return text[len(self._sent.text) :]

    def result(self) -> tuple[str | None, list[ToolCall]]:
        """The whole answer: its text (None when it is only calls) and its calls."""
        reading = self._read(self.raw, True)
        while len(self.ids) < len(reading.calls):
            self.ids.append(self._new_id())
        calls = [
            ToolCall(self.ids[i], name, args)
            for i, (name, args, _) in enumerate(reading.calls)
            if name is not None
        ]
        if calls:
            return (reading.text if reading.text.strip() else None), calls
        return reading.text, []


class ToolSyntax:
    """How a family of chat templates has the model call tools (see the module's doc)."""

    name = "generic"

    def prompt(
        self, messages: list[dict[str, Any]], use: ToolUse | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages as the template takes them, and the tools it is given (None: no
        tools, or a template that is not given them)."""
        return template_messages(messages, use), None

    def constraint(self, use: ToolUse) -> Constraint | None:
        return tool_constraint(use)

    def reader(self) -> AnswerReader:
        return AnswerReader(_read, new_call_id)


GENERIC = ToolSyntax()


class NativeSyntax(ToolSyntax):
    """A template that renders tools and calls itself; the model writes calls in its own way."""

    arguments_key = "arguments"
    frame = Frame(None)
    trigger = ""  # where a call starts, for `auto` (a regular expression)

    def prompt(
        self, messages: list[dict[str, Any]], use: ToolUse | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        out: list[dict[str, Any]] = []
        names: dict[str, str] = {}  # call id -> function name
        for message in messages:
            role = message["role"]
            if role == "assistant" and message.get("tool_calls"):
                calls = []
                for call in message["tool_calls"]:
                    names[call.id] = call.name
                    function = {"name": call.name, "arguments": _json_or_text(call.arguments)}
                    calls.append(
                        {"id": self.call_id(call.id), "type": "function", "function": function}
                    )
                out.append(
                    {
                        "role": "assistant",
                        "content": message.get("content") or "",
                        "tool_calls": calls,
                    }
                )
            elif role == "tool":
                call_id = message.get("tool_call_id") or ""
                tool = {"role": "tool", "tool_call_id": self.call_id(call_id)}
                if call_id in names:
                    tool["name"] = names[call_id]
                out.append({**tool, "content": message.get("content") or ""})
            else:
                kept = {k: message[k] for k in ("name",) if k in message}
                out.append({"role": role, "content": message.get("content") or "", **kept})
        if use is None or not use.offered:
            return out, None
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description else {}),
                    "parameters": t.parameters or {"type": "object", "properties": {}},
                },
            }
            for t in use.offered
        ]
        return out, tools

    def call_id(self, given: str) -> str:
        """A call's id as the template gets it."""
        return given

    def call_schema(self, tool: Tool) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                self.arguments_key: tool.parameters or {"type": "object"},
            },
            "required": ["name", self.arguments_key],
        }

    def constraint(self, use: ToolUse) -> Constraint | None:
        offered = use.offered
        if not offered:
            return None
        calls = [self.call_schema(t) for t in offered]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        frame = Frame(
            schema,
            self.frame.open,
            self.frame.close,
            self.frame.separator,
            many=self.frame.many and use.parallel,
        )
        trigger = self.trigger if use.choice == "auto" else None
        return Constraint.framed(frame, field="tools", trigger=trigger)

    def reader(self) -> AnswerReader:
        return AnswerReader(self.read, new_call_id)

    def read(self, raw: str, final: bool) -> Reading:
        """What `raw` holds; `final`: the answer is whole (an end that might have opened a
        call is text after all)."""
        raise NotImplementedError


class Hermes(NativeSyntax):
    name = "hermes"
    frame = Frame(None, "<tool_call>", "</tool_call>", "</tool_call>\n<tool_call>", many=True)
    trigger = re.escape("<tool_call>")

    def read(self, raw: str, final: bool) -> Reading:
        text, *blocks = raw.split("<tool_call>")
        if not blocks:
            return Reading(raw if final else _held_back(raw, "<tool_call>"))
        reading = Reading(text)
        for block in blocks:
            call = _call_object(_Scanner(block), ("arguments",))
            if call is None:
                break
            reading.calls.append(call)
            if not call[2]:
                break
        return reading


class Llama3(NativeSyntax):
    name = "llama3"
    arguments_key = "parameters"
    frame = Frame(None)
    trigger = r"^\s*(\{)"  # the answer is a call if it starts as a JSON object

    def read(self, raw: str, final: bool) -> Reading:
        body = raw.lstrip()
        if "<|python_tag|>".startswith(body):
            return Reading(raw if final else "")
        body = body.removeprefix("<|python_tag|>").lstrip()
        if not body:
            return Reading()
        if not body.startswith("{"):
            return Reading(raw)
        call = _call_object(_Scanner(body), ("parameters", "arguments"))
        return Reading(calls=[call] if call is not None else [])


class Mistral(NativeSyntax):
    """`[TOOL_CALLS]` is a control token in Mistral's vocabularies: it has no text in the answer,
    so an answer that starts as a JSON array of objects is read as the calls too."""

    name = "mistral"
    frame = Frame(None, "[TOOL_CALLS][", "]", ",", many=True)
    trigger = re.escape("[TOOL_CALLS]")

    def call_id(self, given: str) -> str:
        """Mistral's templates take only ids of nine letters and digits."""
        if len(given) == 9 and given.isalnum():
            return given
        return hashlib.sha256(given.encode()).hexdigest()[:9]

    def call_schema(self, tool: Tool) -> dict[str, Any]:
        schema = super().call_schema(tool)
        schema["properties"]["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        schema["required"].append("id")
        return schema

    def reader(self) -> AnswerReader:
        return AnswerReader(self.read, _mistral_id)

    def read(self, raw: str, final: bool) -> Reading:
        at = raw.find("[TOOL_CALLS]")
        if at >= 0:
            text, calls = raw[:at], raw[at + len("[TOOL_CALLS]") :]
        else:
            body = raw.lstrip()
            if body in ("", "["):
                return Reading(raw if final else "")
            if not body.startswith("[") or not body[1:].lstrip().startswith("{"):
                return Reading(raw if final else _held_back(raw, "[TOOL_CALLS]"))
            text, calls = "", body
        reading = Reading(text)
        scan = _Scanner(calls)
        if scan.take("["):
            _call_list(scan, reading)
        return reading


def syntax_of(template: str | None) -> ToolSyntax:
    """The tool-call syntax of a Jinja chat template's text (None: a template llama.cpp
    renders itself, which takes no tools)."""
    if not template:
        return GENERIC
    if "<tool_call>" in template:
        return Hermes()
    if "[TOOL_CALLS]" in template:
        return Mistral()
    if "<|start_header_id|>ipython<|end_header_id|>" in template:
        return Llama3()
    return GENERIC


def _mistral_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def _held_back(text: str, marker: str) -> str:
    """`text` without an end that could still grow into `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def _call_object(
    scan: _Scanner, argument_keys: tuple[str, ...]
) -> tuple[str | None, str, bool] | None:
    """One call written as a JSON object from the scanner's position: its name, its arguments
    as far as written, whether they are whole (the `}` after them is left). None: no object
    has begun."""
    if not scan.take("{"):
        return None
    raw = scan.text
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
            whole = scan.skip_value()
            if member in argument_keys:
                args = raw[start : scan.pos].rstrip(" \t\r\n") if whole else raw[start:]
                done = whole
            if not whole:
                break
        if not scan.take(","):
            break
    return name, args, done


def _read(raw: str, final: bool = False) -> Reading:
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
    if key == "tool_calls" and scan.take("["):
        _call_list(scan, reading)
    return reading


def _call_list(scan: _Scanner, reading: Reading) -> None:
    """The call objects of a JSON array whose `[` the scanner has read, as far as written."""
    while True:
        call = _call_object(scan, ("arguments",))
        if call is None:
            return
        reading.calls.append(call)
        if not (call[2] and scan.take("}") and scan.take(",")):
            return


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
            self.pos += len(char)
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
    """A call's arguments as the template gets them: the JSON value, or the text if it is not
    JSON (or nests too deeply to read)."""
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
