"""POST /v1/messages (Anthropic's Messages API) driven by the official `anthropic` client,
unchanged, against a node with the bundled model: whole and streamed answers, Anthropic's
event sequence, a tool round trip, errors in Anthropic's shape, and the key from x-api-key."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from gguf_appliance.api.anthropic_schemas import STREAM_EVENTS, AnthropicErrorBody, AnthropicMessage

from .conftest import RunningServer
from .sse import events

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Get the local time in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "hours24": {"type": "boolean"}},
        "required": ["city", "hours24"],
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Name three colours."}]
KEY = "m" * 24


def connect(node: RunningServer, **kw: Any) -> anthropic.Anthropic:
    # The client appends /v1/messages to the base URL: the node's root.
    return anthropic.Anthropic(base_url=node.url(""), **{"api_key": "x", "max_retries": 0, **kw})


@pytest.fixture
def client(server: RunningServer) -> anthropic.Anthropic:
    return connect(server)


def greedy(kw: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments at temperature 0: the node takes `temperature` (as llama.cpp's
    server does), which this client version sends only in extra_body."""
    extra = {"temperature": 0, **kw.pop("extra_body", {})}
    return {"model": "any", "max_tokens": 48, **kw, "extra_body": extra}


def create(client: anthropic.Anthropic, **kw: Any) -> Any:
    return client.messages.create(**greedy(kw))


def test_whole_and_streamed_answers_are_alike(start_server: Any) -> None:
    # Without prefix reuse: a prompt read in other batch sizes gives slightly other logits, and
    # greedy decoding may then part at a near tie; read the same way, the answers are equal.
    node = start_server(reuse_prefix="false")
    client = connect(node)
    whole = create(client, messages=HELLO, system="Answer briefly.")
    assert whole.type == "message" and whole.role == "assistant"
    assert whole.id.startswith("msg_")
    [block] = whole.content
    assert block.type == "text" and block.text
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 48
    raw = httpx.post(
        node.url("/v1/messages"),
        json={
            "model": "any",
            "max_tokens": 48,
            "temperature": 0,
            "messages": HELLO,
            "system": [{"type": "text", "text": "Answer briefly."}],
        },
        timeout=60,
    )
    AnthropicMessage.model_validate(raw.json(), strict=True)

    with client.messages.stream(
        **greedy({"messages": HELLO, "system": "Answer briefly."})
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == block.text
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert (final.stop_reason, final.stop_sequence) == (whole.stop_reason, None)
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens

    kinds = [
        event.type
        for event in create(client, messages=HELLO, system="Answer briefly.", stream=True)
    ]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_the_event_stream_is_anthropics(server: RunningServer) -> None:
    body = {"model": "any", "max_tokens": 12, "messages": HELLO, "stream": True}
    with httpx.stream("POST", server.url("/v1/messages"), json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        seen = list(events(response))
    for name, data in seen:
        assert data["type"] == name  # `event:` and the data's type agree
        STREAM_EVENTS[name].model_validate(data, strict=True)
    names = [name for name, _ in seen]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = seen[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    delta = seen[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert delta["usage"]["output_tokens"] > 0


def test_a_tool_round_trip(start_server: Any) -> None:
    node = start_server(reuse_prefix="false")
    client = connect(node)
    first = create(client, messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "any"})
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert call.name == "get_weather" and isinstance(call.input["city"], str)

    args = greedy({"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": {"type": "any"}})
    with client.messages.stream(**args) as stream:
        pieces = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    [streamed_call] = streamed.content
    assert (streamed_call.name, streamed_call.input) == (call.name, call.input)
    assert json.loads("".join(pieces)) == call.input

    result = json.dumps({"temperature_c": 18, "sky": "sunny"})
    conversation = [
        *ASK,
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}],
        },
    ]
    final = create(client, messages=conversation, tools=[WEATHER], max_tokens=64)
    assert final.stop_reason == "end_turn"
    [answer] = final.content
    assert answer.type == "text" and "18" in answer.text


def test_a_named_tool_without_parallel_use_is_called_once(client: anthropic.Anthropic) -> None:
    many = [{"role": "user", "content": "Time in Paris, Rome, Oslo and Lima?"}]
    choice = {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}
    reply = create(client, messages=many, tools=[WEATHER, TIME], tool_choice=choice)
    [call] = reply.content
    assert call.name == "get_time" and set(call.input) == {"city", "hours24"}
    none = create(client, messages=ASK, tools=[WEATHER], tool_choice={"type": "none"})
    assert [b.type for b in none.content] == ["text"]


def test_a_stop_sequence_ends_the_answer(client: anthropic.Anthropic) -> None:
    stops = {"messages": HELLO, "stop_sequences": ["never said", " "], "max_tokens": 32}
    reply = create(client, **stops)
    [block] = reply.content
    assert " " not in block.text
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", " ")
    with client.messages.stream(**greedy(stops)) as streamed:
        final = streamed.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", " ")
    assert final.content[0].type == "text" and final.content[0].text == block.text


def refused(call: Any) -> str:
    """What the client raises for a refused request: BadRequestError, the error's shape."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        call()
    body = caught.value.body
    AnthropicErrorBody.model_validate(body, strict=True)
    assert body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


def test_what_the_node_cannot_honour_is_refused_by_name(client: anthropic.Anthropic) -> None:
    missing = refused(
        lambda: client.post(
            "/v1/messages", cast_to=anthropic.types.Message, body={"model": "x", "messages": HELLO}
        )
    )
    assert missing.startswith("max_tokens")
    unknown = refused(lambda: create(client, messages=HELLO, extra_body={"frobnicate": 1}))
    assert unknown.startswith("frobnicate")
    thinking = refused(
        lambda: create(client, messages=HELLO, thinking={"type": "enabled", "budget_tokens": 1024})
    )
    assert thinking.startswith("thinking") and "not available" in thinking
    disabled = create(client, messages=HELLO, thinking={"type": "disabled"}, max_tokens=2)
    assert disabled.content
    thought = [
        *HELLO,
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}],
        },
        *HELLO,
    ]
    assert refused(lambda: create(client, messages=thought)).startswith("messages.1.content")
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    pictured = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    message = refused(lambda: create(client, messages=pictured))
    assert message.startswith("messages.0.content") and "'image'" in message
    prefill = [*HELLO, {"role": "assistant", "content": "Red,"}]
    assert refused(lambda: create(client, messages=prefill)).startswith("messages")
    over = refused(lambda: create(client, messages=HELLO, max_tokens=20_000))
    assert over.startswith("max_tokens")
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    assert refused(lambda: create(client, messages=HELLO, tools=[server_tool])).startswith(
        "tools.0"
    )
    hot = refused(lambda: create(client, messages=HELLO, extra_body={"temperature": 1.5}))
    assert hot.startswith("temperature")
    with pytest.raises(anthropic.NotFoundError) as caught:
        create(client, model="other.gguf", messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_the_key_is_taken_from_x_api_key_too(start_server: Any) -> None:
    node = start_server(api_keys=KEY)
    # The client as it comes (this version sends Authorization: Bearer).
    assert create(connect(node, api_key=KEY), messages=HELLO, max_tokens=2).content
    # Anthropic's own header, as its API and older clients send it.
    by_header = connect(node, api_key=None, default_headers={"x-api-key": KEY})
    assert create(by_header, messages=HELLO, max_tokens=2).content
    with pytest.raises(anthropic.AuthenticationError) as caught:
        create(connect(node, api_key="wrong-key-" + "w" * 14), messages=HELLO, max_tokens=2)
    AnthropicErrorBody.model_validate(caught.value.body, strict=True)
    assert caught.value.body["error"]["type"] == "authentication_error"
    wrong = connect(node, api_key=None, default_headers={"x-api-key": "w" * 24})
    with pytest.raises(anthropic.AuthenticationError):
        create(wrong, messages=HELLO, max_tokens=2)
    # x-api-key opens /v1/messages only; the OpenAI routes keep their Bearer key.
    other = httpx.get(node.url("/v1/models"), headers={"x-api-key": KEY})
    assert other.status_code == 401 and "error" in other.json()
