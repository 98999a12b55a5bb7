"""Request bodies of /generate and the OpenAI-compatible API, with their bounds."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .engine import GenerationParams
from .errors import InvalidRequest
from .grammar import LIMITS, check_gbnf, json_object_gbnf, schema_to_gbnf
from .llama import SamplingParams

MAX_STOP_STRINGS = 8
MAX_GRAMMAR_LENGTH = LIMITS.max_chars


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self

    def grammar(self) -> str | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json_object_gbnf()
        assert self.json_schema is not None
        return schema_to_gbnf(self.json_schema.schema_, param="response_format")


class Sampling(BaseModel):
    """Fields every generation request shares; None means the node's default."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="0 picks the likeliest token.")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000, description="0 turns top-k off.")
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 8 strings that end the answer.")
    response_format: ResponseFormat | None = Field(
        None, description="Constrain the answer to JSON, or to JSON matching a schema."
    )
    grammar: str | None = Field(
        None,
        max_length=MAX_GRAMMAR_LENGTH,
        description="A GBNF grammar the answer must match (llama.cpp's).",
    )

    @model_validator(mode="after")
    def _one_constraint(self) -> Sampling:
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.grammar is not None:
            raise ValueError("send at most one of 'grammar' and 'response_format'")
        return self

    def _grammar(self, allow_grammar: bool) -> str | None:
        """The GBNF the answer must match, checked for cost (CPU work: call it off the loop)."""
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            return fmt.grammar()
        if self.grammar is None:
            return None
        if not allow_grammar:
            raise InvalidRequest(
                "this node does not take raw grammars (ALLOW_GRAMMAR is off); use "
                "response_format with a JSON schema",
                param="grammar",
            )
        check_gbnf(self.grammar, param="grammar")
        return self.grammar

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > 200 for s in items):
            raise ValueError("a stop string may have at most 200 characters")
        return stop

    def generation_params(
        self, default_max_tokens: int, *, allow_grammar: bool = True
    ) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return GenerationParams(
            max_tokens=self.max_tokens or default_max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repeat_penalty=self.repeat_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                grammar=self._grammar(allow_grammar),
                grammar_field="grammar" if self.grammar is not None else "response_format",
            ),
            stop=tuple(s for s in stop if s),
        )


class GenerateRequest(Sampling):
    """POST /generate: a prompt (raw text) or messages (a chat), streamed back as SSE."""

    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(Sampling):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[Message] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The prompt; a list must hold exactly one string."
    )
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


_Body = TypeVar("_Body", bound=BaseModel)


def parse_body(body: bytes, model: type[_Body]) -> _Body:
    """Parse a JSON request body into `model`, or raise InvalidRequest saying what is wrong."""
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # also an integer of over 4,300 digits
        raise InvalidRequest(f"the body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidRequest("the body's JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        raise InvalidRequest(_describe(exc), param=".".join(map(str, first)) or None) from None
