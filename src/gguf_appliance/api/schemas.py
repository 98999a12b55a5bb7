"""Request bodies of /generate and the OpenAI-compatible API, with their bounds.

Every bound is stated here, in the field's type, so the OpenAPI document (api/openapi.py) says
what the server takes with no second copy; only the node's own caps come from its settings.
Sampling defaults are the engine's (`llama.SamplingParams`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from ..chat_format import Tool, ToolCall, ToolUse
from ..errors import InvalidRequest
from ..generation import GenerationParams
from ..grammar import LIMITS, Constraint
from ..llama import SamplingParams

_DEFAULT = SamplingParams()
StopString = Annotated[str, Field(max_length=200)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Constraint.json_object()
        assert self.json_schema is not None
        return Constraint.json_schema(self.json_schema.schema_)


class Sampling(BaseModel):
    """Fields every generation request shares; None means the node's default."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        _DEFAULT.temperature, ge=0.0, le=2.0, description="0 picks the likeliest token."
    )
    top_p: float = Field(_DEFAULT.top_p, gt=0.0, le=1.0)
    top_k: int = Field(_DEFAULT.top_k, ge=0, le=1000, description="0 turns top-k off.")
    min_p: float = Field(_DEFAULT.min_p, ge=0.0, le=1.0)
    repeat_penalty: float = Field(_DEFAULT.repeat_penalty, gt=0.0, le=10.0)
    presence_penalty: float = Field(_DEFAULT.presence_penalty, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(_DEFAULT.frequency_penalty, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=8)] | None = Field(
        None, description="Up to 8 strings that end the answer."
    )
    response_format: ResponseFormat | None = Field(
        None, description="Constrain the answer to JSON, or to JSON matching a schema."
    )
    grammar: str | None = Field(
        None,
        max_length=LIMITS.max_chars,
        description="A GBNF grammar the answer must match (llama.cpp's).",
    )

    @model_validator(mode="after")
    def _one_constraint(self) -> Sampling:
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.grammar is not None:
            raise ValueError("send at most one of 'grammar' and 'response_format'")
        return self

    def constraint(self) -> Constraint | None:
        if self.response_format is not None:
            return self.response_format.constraint()
        return None if self.grammar is None else Constraint.gbnf(self.grammar)

    def generation_params(self, default_max_tokens: int) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return GenerationParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repeat_penalty=self.repeat_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                grammar=self.constraint(),
            ),
            stop=tuple(s for s in stop if s),
        )


class GenerateRequest(Sampling):
    """POST /generate: a prompt (raw text) or messages (a chat), streamed back as SSE."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # _one_input, for the OpenAPI document (null = absent)
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    prompt: str | None = Field(None, min_length=1, max_length=1_000_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Literal[False] | None = Field(
        None, description="No obfuscation padding is added to chunks."
    )


class _OpenAIRequest(Sampling):
    # A field this node does not know is refused by name, never silently dropped.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    user: str | None = Field(None, max_length=256, description="Accepted, not used.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(
        1,
        ge=1,
        le=64,
        description="Choices to make, each sampled on its own from the prompt read once "
        "(with a seed, choice i uses seed + i); at most the node's slots, and 1 with a grammar.",
    )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def generation_params(self, default_max_tokens: int) -> GenerationParams:
        return replace(super().generation_params(default_max_tokens), n=self.n)


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName
    arguments: str = Field(max_length=LIMITS.max_chars, description="JSON text.")


class ToolCallItem(BaseModel):
    """A call an earlier assistant message made (as the client sends the conversation back)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Message):
    """A chat message of the OpenAI API: also a tool's result, and an assistant's tool calls."""

    role: Literal["system", "developer", "user", "assistant", "tool"]  # type: ignore[assignment]
    name: str | None = Field(None, max_length=64, description="Passed to the chat template.")
    tool_calls: list[ToolCallItem] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=128)
    # What clients send back of an earlier answer: only empty, as this node makes them.
    refusal: None = None
    audio: None = None
    function_call: None = Field(None, description="Deprecated by OpenAI: send tool_calls.")
    annotations: list[Any] | None = Field(None, max_length=0)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' it answers")
        return self

    def as_chat_message(self) -> dict[str, Any]:
        """The message for chat_format: text, and tool calls as chat_format.ToolCall."""
        message: dict[str, Any] = dict(self.as_template_message())
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema; the arguments are held to it by a grammar."
    )
    strict: bool | None = Field(None, description="Always in force: arguments match the schema.")


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1)
    # Accepted: what they ask for is what the node does anyway, or they only label a request.
    store: Literal[False] | None = Field(None, description="Nothing is stored.")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Accepted, not used (nothing is stored)."
    )
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = Field(None, max_length=1)
    prompt_cache_key: str | None = Field(
        None, max_length=256, description="Accepted: prompt prefixes are reused without it."
    )
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted, not used.")
    logprobs: bool | None = Field(
        None,
        description="Each answer token's log probability: the model's own (log-softmax of "
        "its logits), before temperature and the other samplers.",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: the likeliest tokens at each position."
    )

    @field_validator("tools")
    @classmethod
    def _tools_alone(
        cls, tools: list[ToolDefinition] | None, info: ValidationInfo
    ) -> list[ToolDefinition] | None:
        names = [t.function.name for t in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("two tools have the same name")
        fmt = info.data.get("response_format")
        if names and (info.data.get("grammar") is not None or (fmt and fmt.type != "text")):
            raise ValueError("send tools or a response_format/grammar, not both")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_offered(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or ()]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError("tool_choice names a function that is not in 'tools'")
        if choice in ("auto", "required") and not names:
            raise ValueError(f"tool_choice '{choice}' needs 'tools'")
        return choice

    def tool_use(self) -> ToolUse | None:
        if not self.tools:
            return None
        chosen = self.tool_choice or "auto"
        choice = chosen.function.name if isinstance(chosen, NamedToolChoice) else chosen
        tools = tuple(
            Tool(t.function.name, t.function.description, t.function.parameters) for t in self.tools
        )
        return ToolUse(tools, choice, self.parallel_tool_calls)

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def generation_params(self, default_max_tokens: int) -> GenerationParams:
        params = super().generation_params(default_max_tokens)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs:
            params = replace(params, logprobs=self.top_logprobs or 0)
        return params


PromptText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]], Field(min_length=1)
]


class CompletionRequest(_OpenAIRequest):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    ) = Field(
        description="A text, a list of texts, a list of token ids (of the model's vocabulary) "
        "or a list of those: each prompt gets `n` choices, prompt i's at index i*n to "
        "i*n+n-1. At most the node's slots (N_SLOTS) prompts, times `n`."
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one error naming `prompt`, not each shape it is not
            raise ValueError(
                "the prompt must be a text, a list of 1 to 64 texts, a list of token ids "
                "(0 to 2**31-1) or a list of 1 to 64 such lists, none of them empty"
            ) from None

    max_tokens: int | None = Field(
        None, ge=0, description="Most tokens to generate; 0 (with echo) only scores the prompt."
    )
    echo: bool = Field(False, description="Answer the prompt followed by its completion.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="Each token's log probability and those of the N likeliest tokens there: "
        "the model's own (log-softmax of its logits), before temperature and the other "
        "samplers. With echo, the prompt's tokens' too.",
    )
    suffix: None = None

    def generation_params(self, default_max_tokens: int) -> GenerationParams:
        params = super().generation_params(default_max_tokens)
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens may be 0 only with echo: true", param="max_tokens")
        return replace(
            params,
            logprobs=self.logprobs,
            score_prompt=self.echo and self.logprobs is not None,
        )

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        return [p for p in prompt if isinstance(p, (str, list))]
