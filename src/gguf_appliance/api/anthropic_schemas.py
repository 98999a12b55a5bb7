"""POST /v1/messages (Anthropic's Messages API, as llama.cpp's server offers it): the request
body with its bounds, and the shapes of its answers for the OpenAPI document.

Every field is honoured or refused with a 400 naming it: a field not declared here
(`extra="forbid"`), extended thinking, image, document and thinking blocks, server tools, and a
last assistant turn to continue (prefill: the chat template closes every turn it renders).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..chat_format import Tool, ToolCall, ToolUse
from ..llama import SamplingParams
from .schemas import FunctionName, Sampling, StopString

_DEFAULT = SamplingParams()
# The block types of each role's content; anything else is refused by name.
_BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Body):
    """Accepted; the node needs no hint: it reuses a cached prompt prefix on its own."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlockParam(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = Field(None, description="Citations are not supported: null or absent.")


class ToolUseBlockParam(_Body):
    """A call an earlier assistant turn made (as the client sends the conversation back)."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=128)
    name: FunctionName
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlockParam(_Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=128)
    content: str | Annotated[list[TextBlockParam], Field(max_length=100)] = ""
    is_error: bool = Field(False, description="The result is shown to the model as an error.")
    cache_control: CacheControl | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for i, block in enumerate(content):
                kind = block.get("type") if isinstance(block, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(
                        f"block {i} is a {kind!r} block; a tool result's content is text only"
                    )
        return content

    @property
    def text(self) -> str:
        content = self.content
        text = content if isinstance(content, str) else "".join(b.text for b in content)
        return f"Error: {text}" if self.is_error else text


ContentBlockParam = Annotated[
    TextBlockParam | ToolUseBlockParam | ToolResultBlockParam, Field(discriminator="type")
]


class MessageParam(_Body):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlockParam], Field(max_length=1000)] = Field(
        description="Text, or blocks: text and tool_result in a user turn, text and tool_use "
        "in an assistant turn."
    )

    @field_validator("content", mode="before")
    @classmethod
    def _blocks_taken(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if not isinstance(content, list) or role not in _BLOCKS:
            return content
        for i, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in _BLOCKS[role]:
                raise ValueError(
                    f"block {i} is a {kind!r} block; this node takes "
                    f"{' and '.join(_BLOCKS[role])} blocks in a {role} turn (no images, "
                    "documents or thinking)"
                )
        return content

    def chat_messages(self) -> list[dict[str, Any]]:
        """This turn for chat_format: an assistant's tool_use blocks become its tool calls, a
        user's tool_result blocks `tool` messages (first), then the user's text."""
        content = self.content
        if isinstance(content, str):
            return [{"role": self.role, "content": content}]
        text = "".join(b.text for b in content if isinstance(b, TextBlockParam))
        if self.role == "assistant":
            calls = [
                ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False))
                for b in content
                if isinstance(b, ToolUseBlockParam)
            ]
            return [
                {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
            ]
        out: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text}
            for b in content
            if isinstance(b, ToolResultBlockParam)
        ]
        if text or not out:
            out.append({"role": "user", "content": text})
        return out


class SystemBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = None


class ToolParam(_Body):
    name: FunctionName
    description: str | None = Field(None, max_length=10_000)
    input_schema: dict[str, Any] = Field(
        description="A JSON schema of type object; the input is held to it by a grammar."
    )
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_server_tools(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(f"{kind!r} is a server tool; this node runs none, only custom tools")
        return data

    @field_validator("input_schema")
    @classmethod
    def _object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError("input_schema must be a JSON schema with type 'object'")
        return schema


class ToolChoiceAuto(_Body):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Body):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Body):
    type: Literal["tool"]
    name: FunctionName
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Body):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class Metadata(_Body):
    user_id: str | None = Field(
        None, max_length=256, description="Accepted and not used (not logged, not stored)."
    )


class ThinkingDisabled(_Body):
    type: Literal["disabled"]


class MessagesRequest(_Body):
    """POST /v1/messages. Sampling defaults are the node's (temperature 0.8, top_p 0.95,
    top_k 40); stop_sequences at most 8."""

    model: str = Field(min_length=1, max_length=256, description="Any name but another .gguf.")
    max_tokens: int = Field(ge=1, description="Most tokens to generate (the node's cap).")
    messages: list[MessageParam] = Field(min_length=1, max_length=1000)
    system: str | Annotated[list[SystemBlock], Field(max_length=100)] | None = None
    stop_sequences: Annotated[list[StopString], Field(max_length=8)] | None = None
    temperature: float = Field(_DEFAULT.temperature, ge=0.0, le=1.0)
    top_p: float = Field(_DEFAULT.top_p, gt=0.0, le=1.0)
    top_k: int = Field(_DEFAULT.top_k, ge=0, le=1000, description="0 turns top-k off.")
    stream: bool = False
    tools: list[ToolParam] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    cache_control: CacheControl | None = None
    thinking: ThinkingDisabled | None = Field(
        None, description="Extended thinking is not available: only {'type': 'disabled'}."
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[MessageParam]) -> list[MessageParam]:
        if messages[-1].role != "user":
            raise ValueError(
                "the last message must be the user's: this node does not continue an "
                "assistant turn (prefill)"
            )
        return messages

    @field_validator("tools")
    @classmethod
    def _distinct(cls, tools: list[ToolParam] | None) -> list[ToolParam] | None:
        names = [t.name for t in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("two tools have the same name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_offered(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t.name for t in info.data.get("tools") or ()]
        if isinstance(choice, ToolChoiceTool):
            if choice.name not in names:
                raise ValueError(f"names the tool {choice.name!r}, which is not in 'tools'")
            if choice.name in ("auto", "required", "none"):
                raise ValueError(f"a tool named {choice.name!r} cannot be chosen by name here")
        if isinstance(choice, ToolChoiceAny) and not names:
            raise ValueError("type 'any' needs 'tools'")
        return choice

    @field_validator("thinking", mode="before")
    @classmethod
    def _no_thinking(cls, thinking: Any) -> Any:
        if isinstance(thinking, dict) and thinking.get("type") != "disabled":
            raise ValueError(
                "extended thinking is not available on this node: leave 'thinking' out or "
                "send {'type': 'disabled'}"
            )
        return thinking

    def tool_use(self) -> ToolUse | None:
        if not self.tools:
            return None
        choice = self.tool_choice or ToolChoiceAuto(type="auto")
        if isinstance(choice, ToolChoiceTool):
            chosen = choice.name
        else:
            chosen = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        parallel = not getattr(choice, "disable_parallel_tool_use", False)
        tools = tuple(Tool(t.name, t.description, t.input_schema) for t in self.tools)
        return ToolUse(tools, chosen, parallel)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation for chat_format.template_messages, the system text first."""
        system = self.system
        if isinstance(system, list):
            system = "".join(block.text for block in system)
        out = [{"role": "system", "content": system}] if system else []
        for message in self.messages:
            out.extend(message.chat_messages())
        return out

    def sampling(self) -> Sampling:
        """What the engine gets: the node's Sampling (the tools' grammar is added by start)."""
        return Sampling.model_validate(
            {
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "stop": self.stop_sequences,
            }
        )


# The answers, for the OpenAPI document (tests hold the real ones against them).


class _Answer(BaseModel):
    # A field the document does not name fails the response checks: the document cannot lag.
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Answer):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Answer):
    type: Literal["tool_use"]
    id: str = Field(pattern=r"^toolu_")
    name: str
    input: dict[str, Any] = Field(description="The arguments, matching the tool's input_schema.")


ContentBlock = Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]
StopReason = Literal["end_turn", "max_tokens", "tool_use", "stop_sequence"]


class MessagesUsage(_Answer):
    input_tokens: int = Field(ge=0, description="The prompt's tokens (cached ones too).")
    output_tokens: int = Field(ge=0)


class AnthropicMessage(_Answer):
    id: str = Field(pattern=r"^msg_")
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[ContentBlock] = Field(description="Text, or tool_use blocks; empty for none.")
    model: str
    stop_reason: StopReason
    stop_sequence: str | None = Field(description="Which of stop_sequences ended the answer.")
    usage: MessagesUsage


class StartedMessage(_Answer):
    id: str = Field(pattern=r"^msg_")
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[ContentBlock] = Field(max_length=0)
    model: str
    stop_reason: None
    stop_sequence: None
    usage: MessagesUsage


class MessageStartEvent(_Answer):
    type: Literal["message_start"]
    message: StartedMessage


class ContentBlockStartEvent(_Answer):
    type: Literal["content_block_start"]
    index: int = Field(ge=0)
    content_block: ContentBlock = Field(description="Empty text, or a tool_use with input {}.")


class TextDelta(_Answer):
    type: Literal["text_delta"]
    text: str


class InputJsonDelta(_Answer):
    type: Literal["input_json_delta"]
    partial_json: str = Field(description="The next piece of the input's JSON text.")


class ContentBlockDeltaEvent(_Answer):
    type: Literal["content_block_delta"]
    index: int = Field(ge=0)
    delta: Annotated[TextDelta | InputJsonDelta, Field(discriminator="type")]


class ContentBlockStopEvent(_Answer):
    type: Literal["content_block_stop"]
    index: int = Field(ge=0)


class MessageDelta(_Answer):
    stop_reason: StopReason
    stop_sequence: str | None


class OutputUsage(_Answer):
    output_tokens: int = Field(ge=0)


class MessageDeltaEvent(_Answer):
    type: Literal["message_delta"]
    delta: MessageDelta
    usage: OutputUsage


class MessageStopEvent(_Answer):
    type: Literal["message_stop"]


class AnthropicErrorDetail(_Answer):
    type: Literal[
        "invalid_request_error",
        "authentication_error",
        "not_found_error",
        "request_too_large",
        "overloaded_error",
        "api_error",
    ]
    message: str = Field(description="Names the field at fault, if one is.")


class AnthropicErrorBody(_Answer):
    """Every error of /v1/messages, in Anthropic's shape (also as a stream's `error` event)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# Each event of a streamed answer: its `event:` name and the model of its `data:`.
STREAM_EVENTS: dict[str, type[BaseModel]] = {
    "message_start": MessageStartEvent,
    "content_block_start": ContentBlockStartEvent,
    "content_block_delta": ContentBlockDeltaEvent,
    "content_block_stop": ContentBlockStopEvent,
    "message_delta": MessageDeltaEvent,
    "message_stop": MessageStopEvent,
    "error": AnthropicErrorBody,
}
