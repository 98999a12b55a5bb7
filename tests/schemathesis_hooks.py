"""A schemathesis check of our own (loaded through SCHEMATHESIS_HOOKS by tests/test_openapi.py):
each server-sent event carries a documented event name and JSON data of the documented shape.

OpenAPI 3.1 can only say that `data` is a string of JSON (contentSchema is an annotation), so
the data is checked against the models the document's contentSchema comes from.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from pydantic import BaseModel, ValidationError

from gguf_appliance.api import openapi
from gguf_appliance.api.anthropic_schemas import STREAM_EVENTS

from .sse import parse

STREAM_DATA: dict[str, dict[str, type[BaseModel]]] = {
    "/generate": {
        "token": openapi.TokenData,
        "done": openapi.DoneData,
        "error": openapi.ErrorData,
    },
    "/v1/chat/completions": {"message": openapi.ChatCompletionChunk},
    "/v1/completions": {"message": openapi.CompletionChunk},
    "/v1/messages": STREAM_EVENTS,  # Anthropic's: no [DONE]
    "/v1/responses": openapi.RESPONSES_STREAM_EVENTS,  # no [DONE] either
}


@schemathesis.check
def event_data_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    content_type = response.headers.get("content-type", [""])[0]
    if not content_type.startswith("text/event-stream"):
        return None
    models = STREAM_DATA[case.path]
    events = parse([response.content.decode("utf-8")])
    if not events:
        raise AssertionError("the event stream is empty")
    for event, data in events:
        if event not in models:
            raise AssertionError(f"undocumented event {event!r}")
        if data == "[DONE]" and case.path != "/generate":
            continue
        try:
            models[event].model_validate_json(data, strict=True)
        except ValidationError as exc:
            try:  # a stream cut short by the node ends with an error in the API's shape
                openapi.ErrorBody.model_validate_json(data, strict=True)
            except ValidationError:
                raise AssertionError(f"event {event!r}: {data}: {exc}") from None
    if case.path in ("/v1/chat/completions", "/v1/completions") and events[-1][1] != "[DONE]":
        raise AssertionError("an OpenAI stream must end with data: [DONE]")
    return True
