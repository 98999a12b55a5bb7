from __future__ import annotations

import json
import time
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from .conftest import RunningServer, wait_until

HELLO = [{"role": "user", "content": "Say hello to the world."}]


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_chat_completion_unstreamed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=HELLO,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 0 < reply.usage.completion_tokens <= 16


def test_chat_completion_streamed_with_usage_equals_unstreamed(client: openai.OpenAI) -> None:
    args = {"model": "any", "messages": HELLO, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_without_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="any",
            messages=HELLO,
            max_tokens=8,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_completion_unstreamed_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=12, temperature=0
    )
    assert whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    chunks = list(
        client.completions.create(
            model="any",
            prompt="The capital of France is",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None


def test_stop_sequence_through_the_client(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any",
        temperature=0,
        max_tokens=80,
        stop=["7"],
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
    )
    assert "7" not in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


def test_invalid_parameters_raise_bad_request_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=HELLO, temperature=5)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and "temperature" in body["message"]
    assert body["type"] == "invalid_request_error"


def test_more_choices_than_slots_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:  # the shared node has 8 slots
        client.chat.completions.create(model="any", messages=HELLO, n=9)  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"


def test_prompt_too_long_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="any", prompt="word " * 3000, max_tokens=4)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "context_length_exceeded"


def test_another_models_file_name_gets_404(server: RunningServer) -> None:
    response = httpx.post(
        server.url("/v1/chat/completions"),
        json={"model": "tinyllama-1.1b-chat.Q4_K_M.gguf", "messages": HELLO},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_unstreamed_request_is_cancelled_when_the_client_leaves(server: RunningServer) -> None:
    cancelled = 'gguf_appliance_generations_total{finish_reason="cancelled"}'
    gone = 'gguf_appliance_requests_total{route="/v1/chat/completions",status="499"}'
    before = server.metric(cancelled, default=0), server.metric(gone, default=0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url("/v1/chat/completions"),
            timeout=0.5,
            json={
                "model": "any",
                "max_tokens": 1500,
                "temperature": 0.7,
                "messages": [
                    {"role": "user", "content": "Write a very long story about a dragon."}
                ],
            },
        )
    wait_until(
        lambda: (
            server.metric("gguf_appliance_busy_slots") == 0
            and server.metric(cancelled, default=0) > before[0]
            and server.metric(gone, default=0) > before[1]
        ),
        10,
        "the slot never freed with the request counted as cancelled and 499",
    )
    tokens = server.metric("gguf_appliance_completion_tokens_total")
    # The window is the test: nothing more is generated over the next half second.
    time.sleep(0.5)
    assert server.metric("gguf_appliance_completion_tokens_total") == tokens
    assert server.metric("gguf_appliance_busy_slots") == 0
    assert server.metric(cancelled) == before[0] + 1
    assert server.metric(gone) == before[1] + 1


def test_json_schema_response_format_is_followed(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Invent a person. Give a name and an age."}],
        max_tokens=64,
        temperature=0.9,  # sampled, not greedy: the grammar alone must keep it in shape
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    person = json.loads(reply.choices[0].message.content or "")
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)


def test_the_clients_parse_helper_gets_a_pydantic_object(client: openai.OpenAI) -> None:
    class Verdict(BaseModel):
        sentiment: Literal["positive", "negative"]

    reply = client.chat.completions.parse(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Review: awful, it broke. Sentiment?"}],
        max_tokens=32,
        temperature=0,  # type: ignore[arg-type]
        response_format=Verdict,
    )
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Verdict)
    assert parsed.sentiment in ("positive", "negative")


def test_json_object_response_format_gives_an_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        max_tokens=96,
        temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    content = reply.choices[0].message.content or ""
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert content.lstrip().startswith("{")


def test_grammar_extension_on_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        prompt="The answer is",
        max_tokens=8,
        temperature=1.0,
        seed=3,
        extra_body={"grammar": 'root ::= " yes" | " no"'},
    )
    assert reply.choices[0].text in (" yes", " no")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"grammar": "root ::= ("}, "grammar"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "x"}}}},
            "response_format",
        ),
        ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, None),
    ],
)
def test_bad_constraints_are_refused_with_400(
    server: RunningServer, extra: dict[str, object], param: str | None
) -> None:
    body = {"messages": HELLO, "max_tokens": 4, **extra}
    response = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert (error["param"] or "").startswith(param)
