"""The OpenAPI 3.1 document of the node's API, served at /openapi.json.

Request bodies are the pydantic models the routes validate with (schemas.py), bounds and all,
so the document says what the server accepts; only the node's own caps (max_tokens_cap, the
body size, the keys) are filled in from its settings. Responses are described by the models
here; tests hold them against the real server (schemathesis, with response conformance checks).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..settings import Settings
from .anthropic_schemas import STREAM_EVENTS, AnthropicMessage, MessagesRequest
from .embeddings import EmbeddingRequest
from .responses import ResponsesRequest
from .schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

REF = "#/components/schemas/{model}"


class _Response(BaseModel):
    # A field the document does not name fails the response checks: the document cannot lag.
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Response):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class Live(_Response):
    status: Literal["live"]


class Ready(_Response):
    status: Literal["ready"]
    model: str


class NotReady(_Response):
    status: Literal["loading", "failed", "draining"]
    reason: str


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    chat_template: str | None = Field(
        None,
        description="Not OpenAI's: the chat template in use and where it came from (the GGUF, "
        "the CHAT_TEMPLATE setting, or guessed from the architecture); absent on an "
        "embedding model's card.",
    )
    tool_call_syntax: Literal["hermes", "llama3", "mistral", "generic"] | None = Field(
        None,
        description="Not OpenAI's: how the model calls tools (its template's syntax, or the "
        "generic JSON form); absent on an embedding model's card.",
    )
    context_length: int | None = Field(
        None,
        ge=1,
        description="Not OpenAI's: tokens of context per request, prompt and answer together; "
        "absent on an embedding model's card.",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Not OpenAI's: the longest prompt in tokens a request may have (a longer "
        "one gets 400 `context_length_exceeded`); absent on an embedding model's card.",
    )


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard] = Field(description="The served model; empty while it loads.")


class PromptTokensDetails(_Response):
    cached_tokens: int = Field(ge=0)


class Usage(_Response):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Response):
    token: str = Field(description="The token's text (a byte of a split character as \\xNN).")
    logprob: float = Field(description="The model's own: log-softmax of its logits.")
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The likeliest tokens there, best first.")


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class CompletionLogprobs(_Response):
    """OpenAI's legacy shape; with echo, the prompt's tokens first (the first has none)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The likeliest tokens at each position, and the chosen one."
    )
    text_offset: list[int] = Field(description="Characters before each token, from the prompt's.")


class FunctionCall(_Response):
    name: str
    arguments: str = Field(description="JSON text matching the tool's parameters.")


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None = Field(description="None when the answer is tool calls.")
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = Field(None, description="With `logprobs: true`.")


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1, description="`n` of them, by index.")
    usage: Usage


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice] = Field(min_length=1, description="`n` of them, by index.")
    usage: Usage


class Embedding(_Response):
    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(
        description="L2-normalised; with `encoding_format: base64`, its little-endian float32 "
        "bytes in base64."
    )


class EmbeddingUsage(_Response):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(_Response):
    object: Literal["list"]
    data: list[Embedding] = Field(min_length=1, description="One per input, in their order.")
    model: str
    usage: EmbeddingUsage


# What the `data:` of each server-sent event holds (JSON), by stream.


class TokenData(_Response):
    text: str


class DoneData(_Response):
    finish_reason: Literal["stop", "length", "cancelled", "timeout"]
    prompt_tokens: int = Field(ge=0)
    cached_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    time_to_first_token: float | None
    tokens_per_second: float | None
    queue_seconds: float
    duration: float


class ErrorData(_Response):
    message: str
    code: str
    status: int


class FunctionCallDelta(_Response):
    name: str | None = Field(None, description="In a call's first delta only.")
    arguments: str = Field(description="The next piece of the arguments' JSON text.")


class ToolCallDelta(_Response):
    index: int
    id: str | None = Field(None, description="In a call's first delta only.")
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChatLogprobs | None = Field(None, description="This chunk's tokens'.")


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(max_length=1, description="Empty in the usage chunk.")
    usage: Usage | None = None


class CompletionChoiceDelta(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = Field(description="This chunk's tokens'.")
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoiceDelta] = Field(
        max_length=1, description="Empty in the usage chunk."
    )
    usage: Usage | None = None


_REQUESTS: list[type[BaseModel]] = [
    GenerateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    MessagesRequest,
    EmbeddingRequest,
    ResponsesRequest,
]
_RESPONSES: list[type[BaseModel]] = [
    ErrorBody,
    Live,
    Ready,
    NotReady,
    ModelList,
    ChatCompletion,
    Completion,
    TokenData,
    DoneData,
    ErrorData,
    ChatCompletionChunk,
    CompletionChunk,
    EmbeddingList,
    *STREAM_EVENTS.values(),  # /v1/messages' events; also its errors
    AnthropicMessage,
]

_GENERATE_STREAM = """\
Server-sent events: `token` events (`{"text": ...}`, the answer's next piece: the first token \
at once, then what was decoded in the last STREAM_INTERVAL; never a broken character or part \
of a stop string), then one `done` event (`{"finish_reason", \
"prompt_tokens", "cached_tokens", "completion_tokens", "time_to_first_token", \
"tokens_per_second", "queue_seconds", "duration"}`) or one `error` event (`{"message", "code", \
"status"}`) if the node failed mid-answer."""
_OPENAI_STREAM = """\
With `stream: true`: server-sent events, each `data:` a chunk in OpenAI's format, then \
`data: [DONE]`."""


def _component_schemas() -> dict[str, Any]:
    models = [(m, "validation") for m in _REQUESTS] + [(m, "serialization") for m in _RESPONSES]
    _, definitions = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


def _cap_max_tokens(schemas: dict[str, Any], settings: Settings) -> None:
    """State the node's max_tokens_cap and slots (settings) on the fields they bound."""
    for name in (
        "GenerateRequest",
        "ChatCompletionRequest",
        "CompletionRequest",
        "ResponsesRequest",
    ):
        properties = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            for option in properties.get(field, {}).get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = settings.max_tokens_cap
        if "n" in properties:
            properties["n"]["maximum"] = settings.n_slots


class ResponsesStreamEvent(BaseModel):
    """Any event of a streamed /v1/responses: its `type` is the SSE event's name."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int = Field(ge=0)


RESPONSES_STREAM_EVENTS: dict[str, type[BaseModel]] = {
    kind: ResponsesStreamEvent
    for kind in (
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
        "response.incomplete",
        "error",
    )
}

# The Responses API's response object, as far as the node fills it in.
_RESPONSE_OBJECT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete"]},
        "model": {"type": "string"},
        "output": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "status"],
                "properties": {"type": {"enum": ["message", "function_call"]}},
            },
        },
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens", "total_tokens"],
        },
    },
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=schema)}}}


def _event_stream(data_by_event: dict[str, str], *, done_marker: bool) -> dict[str, Any]:
    """A text/event-stream whose events are named by `data_by_event`, each with JSON data of
    that component (an OpenAI stream's error arrives as an `ErrorBody` and it ends with
    `data: [DONE]`). OpenAPI 3.1 has `schema` describe one event."""
    events = []
    for event, component in data_by_event.items():
        data: dict[str, Any] = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": REF.format(model=component)},
        }
        if done_marker:
            data["contentSchema"] = {
                "oneOf": [data["contentSchema"], {"$ref": REF.format(model="ErrorBody")}]
            }
            data = {"anyOf": [{"const": "[DONE]"}, data]}
        events.append(
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {"event": {"const": event}, "data": data},
            }
        )
    schema = events[0] if len(events) == 1 else {"oneOf": events}
    return {"text/event-stream": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("ErrorBody")}


_REQUEST_ID_HEADER = {
    "X-Request-ID": {
        "description": "The request's id: the client's X-Request-ID if it is a plain token, "
        "else a new one. The log line carries it too.",
        "required": True,
        "schema": {"type": "string"},
    }
}


def _with_request_id(responses: dict[str, Any]) -> dict[str, Any]:
    for response in responses.values():
        response["headers"] = {**_REQUEST_ID_HEADER, **response.get("headers", {})}
    return responses


def _generation_errors(settings: Settings) -> dict[str, Any]:
    return {
        "400": _error(
            "Malformed JSON, a field out of range, max_tokens above the node's cap, or a prompt "
            "longer than the context or `max_prompt_tokens` (`code: context_length_exceeded`), "
            "or a grammar or JSON schema over its limits (`param` names the field)."
        ),
        "413": _error(f"A body larger than {settings.max_body_bytes} bytes."),
        "415": _error("A body sent as anything but `Content-Type: application/json`."),
        "503": {
            **_error(
                "The queue is full (`queue_full`, with Retry-After), the model is not loaded "
                "(`not_ready`) or the node is shutting down (`draining`)."
            ),
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying (queue full, loading).",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            },
        },
    }


def _embedding_errors(settings: Settings) -> dict[str, Any]:
    errors = _generation_errors(settings)
    errors["400"] = _error(
        "Malformed JSON, a field not named here (`param` names it), an input of the wrong shape, "
        "a token id the model lacks, `dimensions` other than the model's size, an input longer "
        f"than the embedding context (`code: context_length_exceeded`) or more than "
        f"{settings.embedding_max_tokens} tokens in all (`param: input`)."
    )
    errors["503"]["description"] = (
        "The node is busy with other embedding requests (`queue_full`, with Retry-After), the "
        "model is not loaded (`not_ready`) or the node is shutting down (`draining`)."
    )
    return errors


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    protected: bool,
    keys: bool,
    body: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary}
    if description:
        operation["description"] = description
    if body:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    if protected:  # /generate and /v1: the limits of a key (or of an address sending one)
        responses["429"] = {
            **_error(
                "The key is over its requests a second or its streams (KEY_RATE, "
                "KEY_CONCURRENCY; the BATCH_ ones for a batch key), or on an open API the "
                "address that sends a key header is (`code: rate_limited`, with Retry-After)."
            ),
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            },
        }
    if protected and keys:
        operation["security"] = [{"bearer": []}]
        responses["401"] = {
            **_error("No valid `Authorization: Bearer KEY`."),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        }
    operation["responses"] = _with_request_id(responses)
    return operation


def _messages_operation(settings: Settings, keys: bool) -> dict[str, Any]:
    """POST /v1/messages: Anthropic's Messages API, every error in Anthropic's shape."""
    events = {name: model.__name__ for name, model in STREAM_EVENTS.items()}
    stream = "With `stream: true`: Anthropic's server-sent events, each `event: TYPE` with JSON "
    stream += "data of that `type`: message_start, then per content block content_block_start, "
    stream += "content_block_delta (text_delta or input_json_delta), content_block_stop; then "
    stream += "message_delta and message_stop, or an `error` event. Keep-alive: `: ping` lines."
    content = {**_json("AnthropicMessage"), **_event_stream(events, done_marker=False)}
    responses = {
        "200": {"description": stream, "content": content},
        "404": _error("A model name that is another model's .gguf file."),
        **_generation_errors(settings),
    }
    responses["400"]["description"] = (
        "Malformed JSON, a field not named here, one the node cannot honour (thinking, an "
        "image, document or thinking block, a server tool, a last assistant turn to continue), "
        "a value out of range, max_tokens above the node's cap, or a prompt too long; the "
        "message starts with the field at fault."
    )
    operation = _operation(
        "Anthropic-compatible messages",
        responses,
        protected=True,
        body="MessagesRequest",
        keys=keys,
    )
    for response in operation["responses"].values():
        if response.get("content") == _json("ErrorBody"):
            response["content"] = _json("AnthropicErrorBody")
    if keys:
        operation["security"] = [{"bearer": []}, {"x_api_key": []}]
        operation["responses"]["401"]["description"] = "No valid key (Bearer or x-api-key)."
    return operation


def openapi_document(settings: Settings, keys_required: bool) -> dict[str, Any]:
    """The document for a node with these settings (its caps; whether keys are required)."""
    schemas = _component_schemas()
    _cap_max_tokens(schemas, settings)
    schemas["MessagesRequest"]["properties"]["max_tokens"]["maximum"] = settings.max_tokens_cap
    generate_ok = _event_stream(
        {"token": "TokenData", "done": "DoneData", "error": "ErrorData"}, done_marker=False
    )
    openai_ok = {
        **_json("ChatCompletion"),
        **_event_stream({"message": "ChatCompletionChunk"}, done_marker=True),
    }
    completion_ok = {
        **_json("Completion"),
        **_event_stream({"message": "CompletionChunk"}, done_marker=True),
    }
    not_found = _error("A model name that is another model's .gguf file.")
    paths = {
        "/generate": {
            "post": _operation(
                "Generate an answer, streamed as server-sent events",
                {
                    "200": {"description": _GENERATE_STREAM, "content": generate_ok},
                    **_generation_errors(settings),
                },
                protected=True,
                body="GenerateRequest",
                keys=keys_required,
            )
        },
        "/v1/chat/completions": {
            "post": _operation(
                "OpenAI-compatible chat completion",
                {
                    "200": {"description": _OPENAI_STREAM, "content": openai_ok},
                    "404": not_found,
                    **_generation_errors(settings),
                },
                protected=True,
                body="ChatCompletionRequest",
                keys=keys_required,
            )
        },
        "/v1/completions": {
            "post": _operation(
                "OpenAI-compatible text completion",
                {
                    "200": {"description": _OPENAI_STREAM, "content": completion_ok},
                    "404": not_found,
                    **_generation_errors(settings),
                },
                protected=True,
                body="CompletionRequest",
                keys=keys_required,
            )
        },
        "/v1/responses": {
            "post": _operation(
                "OpenAI-compatible Responses API (stateless)",
                {
                    "200": {
                        "description": "A response object, or with `stream: true` its "
                        "events (`response.created` ... `response.completed`), each "
                        "`event: TYPE` with JSON data of that `type`.",
                        "content": {
                            "application/json": {"schema": _RESPONSE_OBJECT},
                            "text/event-stream": {"schema": {"type": "object"}},
                        },
                    },
                    "404": not_found,
                    **_generation_errors(settings),
                },
                protected=True,
                body="ResponsesRequest",
                keys=keys_required,
            )
        },
        "/v1/embeddings": {
            "post": _operation(
                "OpenAI-compatible embeddings",
                {
                    "200": {
                        "description": "One vector per input, pooled as the model says (mean "
                        "for a model that says nothing, such as a chat model), L2-normalised.",
                        "content": _json("EmbeddingList"),
                    },
                    "404": not_found,
                    **_embedding_errors(settings),
                },
                protected=True,
                body="EmbeddingRequest",
                keys=keys_required,
            )
        },
        "/v1/messages": {"post": _messages_operation(settings, keys_required)},
        "/v1/models": {
            "get": _operation(
                "The served model",
                {"200": {"description": "The model list.", "content": _json("ModelList")}},
                protected=True,
                keys=keys_required,
            )
        },
        "/health/live": {
            "get": _operation(
                "Liveness: 200 while the process runs",
                {"200": {"description": "Alive.", "content": _json("Live")}},
                protected=settings.health_requires_key,
                keys=keys_required,
            )
        },
        "/health/ready": {
            "get": _operation(
                "Readiness: the load balancer's check",
                {
                    "200": {"description": "The model is loaded.", "content": _json("Ready")},
                    "503": {
                        "description": "Loading, failed or draining, with the reason.",
                        "content": _json("NotReady"),
                    },
                },
                protected=settings.health_requires_key,
                keys=keys_required,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "The Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                protected=settings.metrics_requires_key,
                keys=keys_required,
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                protected=False,
                keys=keys_required,
            )
        },
    }
    components: dict[str, Any] = {"schemas": schemas}
    if keys_required:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        components["securitySchemes"]["x_api_key"] = {  # /v1/messages only
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gguf-appliance",
            "version": __version__,
            "description": "An LLM node: /generate (server-sent events), an OpenAI-compatible "
            "/v1 (chat, completions, embeddings), health checks and metrics.",
        },
        "paths": paths,
        "components": components,
    }
