"""POST /v1/responses, driven by the official openai client and the Agents SDK, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from .conftest import RunningServer

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Without prefix reuse, so the same request reads its prompt the same way every time and
    # greedy answers can be compared whole (streamed or not).
    log = tmp_path_factory.mktemp("responses") / "node.log"
    server = RunningServer({"GGUF_APPLIANCE_REUSE_PREFIX": "false"}, log)
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(node: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url("/v1"), api_key="unused", max_retries=0)


def test_text_whole_and_streamed_alike(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "any",
        "input": "Say hello.",
        "instructions": "Be brief.",
        "max_output_tokens": 24,
        "temperature": 0,
    }
    whole = client.responses.create(**args)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage is not None and 0 < whole.usage.output_tokens <= 24
    events = list(client.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == whole.output_text
    with client.responses.stream(**args) as helper:
        assert helper.get_final_response().output_text == whole.output_text


def test_a_short_limit_is_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="m", input="Tell me a long story.", max_output_tokens=3)
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"


def test_a_function_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="m", input=ASK, tools=[WEATHER], tool_choice="required", temperature=0
    )
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_")
    streamed = list(
        client.responses.create(
            model="m",
            input=ASK,
            tools=[WEATHER],
            tool_choice="required",
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in streamed]
    assert kinds[2] == "response.output_item.added"
    assert "response.function_call_arguments.delta" in kinds
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [(call.name, call.arguments)]  # type: ignore[union-attr]
    final = client.responses.create(
        model="m",
        input=[
            {"role": "user", "content": ASK},
            call,  # the SDK's own output item, sent back as it came
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"},
        ],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=64,
    )
    assert final.output[0].type == "message" and "18" in final.output_text


def test_parse_holds_the_answer_to_the_model(client: openai.OpenAI) -> None:
    class City(BaseModel):
        name: str
        country: str

    reply = client.responses.parse(
        model="m",
        input="Name a city in France.",
        text_format=City,
        temperature=0,
        max_output_tokens=64,
    )
    assert isinstance(reply.output_parsed, City) and reply.output_parsed.name


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ],
)
def test_what_the_node_cannot_do_is_a_400_naming_the_field(
    node: RunningServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "m", "input": "hi", "max_output_tokens": 4, **extra}
    response = httpx.post(node.url("/v1/responses"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()
