"""Tool calls on /v1/chat/completions, driven by the clients people use, unchanged: the
official `openai` client, the OpenAI Agents SDK and LangChain, against a node with the bundled
model (whose template knows no tools: the generic JSON form, held by a grammar)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.chat_format import GENERIC

from .conftest import RunningServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "hours24": {"type": "boolean"}},
            "required": ["city", "hours24"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def create(client: openai.OpenAI, **kw: Any) -> Any:
    args = {"model": "any", "temperature": 0, "max_tokens": 128, **kw}
    return client.chat.completions.create(**args)


def streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """Text, calls (id, name, arguments joined from their deltas) and the finish reason."""
    text, calls, reason = "", [], None
    for chunk in create(client, stream=True, **kw):
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for part in choice.delta.tool_calls or ():
            if part.id is not None:
                assert part.index == len(calls)  # name first, in its own delta
                calls.append({"id": part.id, "name": part.function.name, "arguments": ""})
            calls[part.index]["arguments"] += part.function.arguments or ""
        reason = choice.finish_reason or reason
    return text, calls, reason


def test_required_gives_a_valid_call_streamed_and_not_alike(client: openai.OpenAI) -> None:
    whole = create(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    text, calls, reason = streamed(
        client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required"
    )
    assert (text, reason) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (call.function.name, call.function.arguments)
    ]


def test_a_named_function_is_the_one_called_with_its_schema(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    reply = create(
        client, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert set(arguments) == {"city", "hours24"}
        assert isinstance(arguments["hours24"], bool)


def test_parallel_tool_calls_false_makes_one_call(client: openai.OpenAI) -> None:
    many = [{"role": "user", "content": "Weather in Paris, Rome, Oslo and Lima?"}]
    reply = create(
        client, messages=many, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False
    )
    assert len(reply.choices[0].message.tool_calls) == 1


def test_none_leaves_the_tools_out(client: openai.OpenAI) -> None:
    reply = create(client, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=24)
    message = reply.choices[0].message
    assert message.tool_calls is None and message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_result_fed_back_gets_a_final_answer_streamed_and_not_alike(start_server: Any) -> None:
    # Without prefix reuse: a prompt read in other batch sizes gives slightly other logits, and
    # greedy decoding may then part at a near tie; read the same way, the answers are equal.
    node = start_server(reuse_prefix="false")
    client = openai.OpenAI(base_url=node.url("/v1"), api_key="unused", max_retries=0)
    first = create(client, messages=ASK, tools=[WEATHER], tool_choice="required")
    message = first.choices[0].message
    [call] = message.tool_calls
    result = json.dumps({"temperature_c": 18, "sky": "sunny"})
    conversation = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = create(client, messages=conversation, tools=[WEATHER])
    answer = final.choices[0].message
    assert final.choices[0].finish_reason == "stop"
    assert answer.tool_calls is None and "18" in (answer.content or "")
    text, calls, reason = streamed(client, messages=conversation, tools=[WEATHER])
    assert (text, calls, reason) == (answer.content, [], "stop")


def test_the_clients_parse_helper_gives_a_tools_arguments_as_a_pydantic_object(
    client: openai.OpenAI,
) -> None:
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        """Get the current weather in a city"""

        city: str
        celsius: bool

    reply = client.chat.completions.parse(
        model="any",
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],  # strict: additionalProperties false
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "GetWeather"
    parsed = call.function.parsed_arguments
    assert isinstance(parsed, GetWeather) and isinstance(parsed.celsius, bool)


@pytest.mark.parametrize("api", ["chat completions", "responses"])
def test_the_agents_sdk_runs_a_function_tool_to_its_final_answer(
    server: RunningServer, api: str
) -> None:
    # The SDK's two models: Chat Completions, and Responses (its default).
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"18 degrees and sunny in {city}"

    kind = OpenAIChatCompletionsModel if api == "chat completions" else OpenAIResponsesModel
    model = kind(
        model="SmolLM2",
        openai_client=openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0),
    )
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=128),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert seen and all(city.strip() for city in seen)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"


def test_langchain_bind_tools_calls_and_answers(server: RunningServer) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time(city: str) -> str:
        """Get the local time in a city."""
        return f"It is 14:05 in {city}"

    llm = ChatOpenAI(
        base_url=server.url("/v1"), api_key="x", model="m", temperature=0, max_tokens=128
    )
    messages: list[Any] = [HumanMessage("What time is it in Tokyo?")]
    ai = llm.bind_tools([get_time], tool_choice="get_time").invoke(messages)
    assert ai.tool_calls and all(c["name"] == "get_time" for c in ai.tool_calls)
    assert all(isinstance(c["args"]["city"], str) for c in ai.tool_calls)
    results = [ToolMessage(get_time.invoke(c["args"]), tool_call_id=c["id"]) for c in ai.tool_calls]
    final = llm.bind_tools([get_time]).invoke([*messages, ai, *results])
    assert not final.tool_calls and "14:05" in str(final.content)


def post(server: RunningServer, **body: Any) -> httpx.Response:
    return httpx.post(server.url("/v1/chat/completions"), json={"model": "m", **body}, timeout=30)


def test_hostile_tools_are_refused_naming_the_field(server: RunningServer) -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(400):  # 800 levels of JSON: within what the body parser takes
        deep = {"type": "object", "properties": {"a": deep}}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(30000)}}
    long_strings = {
        "type": "object",
        "properties": {"x": {"type": "array", "items": {"type": "string", "maxLength": 9999}}},
    }
    cases = [
        ({"tools": [WEATHER] * 2}, "tools"),  # the same name twice
        (
            {
                "tools": [
                    {**TIME, "function": {**TIME["function"], "name": f"f{i}"}} for i in range(129)
                ]
            },
            "tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        (
            {"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": deep}}]},
            "tools",
        ),
        (
            {"tools": [{**WEATHER, "function": {**WEATHER["function"], "parameters": wide}}]},
            "tools",
        ),
        (
            {
                "tools": [
                    {
                        **WEATHER,
                        "function": {
                            **WEATHER["function"],
                            "parameters": {
                                **long_strings,
                                "properties": {
                                    "x": {**long_strings["properties"]["x"], "maxItems": 9999}
                                },
                            },
                        },
                    }
                ]
            },
            "tools",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            None,
        ),
        ({"tool_choice": "required"}, None),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, None),
    ]
    for extra, param in cases:
        response = post(server, messages=ASK, **extra)
        assert response.status_code == 400, (extra.keys(), response.text[:300])
        error = response.json()["error"]
        if param is not None:
            assert error["param"] == param, error
    deeper = '{"type": "object", "properties": {"a": ' * 3000 + "{}" + "}}" * 3000
    tool = '{"type": "function", "function": {"name": "f", "parameters": ' + deeper + "}}"
    chat = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
    body = chat + '"tools": [' + tool + "]}"
    response = httpx.post(
        server.url("/v1/chat/completions"),
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and "nests too deeply" in response.json()["error"]["message"]
    lost = [*ASK, {"role": "tool", "content": "18 degrees"}]  # no tool_call_id
    response = post(server, messages=lost)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.1"
    assert post(server, messages=ASK, max_tokens=4).status_code == 200  # the node is unharmed


def test_the_streaming_reader_gives_the_same_answer_piece_by_piece() -> None:
    raw = (
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par\\u00e9s \\"x\\"", '
        '"days": [1, 2]}}, {"name": "get_time", "arguments": {"city": "Oslo"}}]}'
    )
    whole = GENERIC.reader()
    whole.feed(raw)
    _, calls = whole.result()
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Par\u00e9s "x"', "days": [1, 2]}),
        ("get_time", {"city": "Oslo"}),
    ]
    pieces = GENERIC.reader()
    got: dict[int, list[Any]] = {}
    for char in raw:
        text, deltas = pieces.feed(char)
        assert text == ""
        for index, name, arguments in deltas:
            if name is not None:
                got[index] = [name, ""]
            got[index][1] += arguments
    assert [tuple(v) for v in got.values()] == [(c.name, c.arguments) for c in calls]

    response = '{"response": "caf\\u00e9 \\n\\"ok\\""}'
    reader, text = GENERIC.reader(), ""
    for char in response:
        piece, deltas = reader.feed(char)
        assert deltas == []
        text += piece
    assert text == 'caf\u00e9 \n"ok"' == reader.result()[0]
