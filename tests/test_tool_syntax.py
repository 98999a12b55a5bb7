"""Native tool-call syntaxes, with the real chat templates of Qwen 2.5 (Hermes' `<tool_call>`),
Llama 3.1 and Mistral Nemo, from the llama.cpp source that llama-cpp-python's sdist vendors
(`make test` puts them in .venv/llama-templates; LLAMA_TEMPLATES names the folder).

No GGUF of a model with such a template can be had from the package registries, so the nodes
here serve the bundled model with each of these templates (CHAT_TEMPLATE): the prompt, the
grammar and the reading of the answer are the real ones; only the model is not the one the
template was written for, and the grammar holds it to the syntax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.chat_format import GENERIC, Tool, ToolCall, ToolSyntax, ToolUse, syntax_of
from gguf_appliance.chat_template import JinjaTemplate
from gguf_appliance.errors import InvalidRequest
from gguf_appliance.grammar_worker import Grammar, GrammarPool
from gguf_appliance.llama import LlamaModel

from .conftest import RunningServer, wait_until
from .test_tools import ASK, TIME, WEATHER, create, streamed

TEMPLATES = Path(os.environ.get("LLAMA_TEMPLATES", ".venv/llama-templates"))
FAMILIES = {
    "hermes": "Qwen-Qwen2.5-7B-Instruct",
    "llama3": "meta-llama-Llama-3.1-8B-Instruct",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407",
}


def source(name: str) -> str:
    path = TEMPLATES / f"{name}.jinja"
    assert path.is_file(), f"{path} is missing: `make test` fetches the templates"
    return path.read_text()


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("Qwen-Qwen2.5-7B-Instruct", "hermes"),
        ("Qwen-Qwen3-0.6B", "hermes"),
        ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "hermes"),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama-Llama-3.2-3B-Instruct", "llama3"),
        ("meta-llama-Llama-3.3-70B-Instruct", "llama3"),
        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
        ("Mistral-Small-3.2-24B-Instruct-2506", "mistral"),
        ("microsoft-Phi-3.5-mini-instruct", "generic"),
    ],
)
def test_each_family_of_templates_is_recognised(template: str, family: str) -> None:
    assert syntax_of(source(template)).name == family


def test_the_bundled_models_template_and_llama_cpps_own_have_the_generic_form(
    model_path: Path,
) -> None:
    model = LlamaModel(model_path, n_ctx=256, n_seq=1, n_batch=32, threads=1)
    try:
        assert model.tool_syntax is GENERIC
    finally:
        model.close()
    assert syntax_of(None) is GENERIC


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
CALL = ToolCall("call_0123456789abcdef01234567", "get_weather", '{"city": "Paris"}')
ROUND_TRIP: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": CALL.id, "content": "18 C and sunny"},
]
WEATHER_TOOL = Tool("get_weather", "Get the current weather in a city", WEATHER_SCHEMA)
USE = ToolUse((WEATHER_TOOL,))


def render(family: str, messages: list[dict[str, Any]], use: ToolUse | None) -> str:
    syntax = syntax_of(source(FAMILIES[family]))
    chat, tools = syntax.prompt(messages, use)
    template = JinjaTemplate(source(FAMILIES[family]), bos="<s>", eos="</s>", label="test")
    return template.render(chat, tools)


def test_tools_calls_and_results_are_written_in_each_templates_own_form() -> None:
    qwen = render("hermes", ROUND_TRIP, USE)
    tools = qwen.split("<tools>\n")[-1].split("</tools>")[0]
    assert json.loads(tools)["function"]["name"] == "get_weather"
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in qwen
    )
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in qwen
    llama = render("llama3", ROUND_TRIP, USE)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in llama
    assert "<|start_header_id|>ipython<|end_header_id|>" in llama
    assert '"description": "Get the current weather in a city"' in llama
    mistral = render("mistral", ROUND_TRIP, USE)
    assert mistral.index("[AVAILABLE_TOOLS]") < mistral.index("[INST]")
    calls = mistral.split("[TOOL_CALLS]")[1].split("</s>")[0]
    [call] = json.loads(calls)
    # Mistral's templates take only ids of nine letters and digits: the node maps others.
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"}
    assert len(call["id"]) == 9 and call["id"].isalnum()
    assert f'"call_id": "{call["id"]}"' in mistral.split("[TOOL_RESULTS]")[1]
    # No tools offered (tool_choice none): the conversation's calls stay, the tools go.
    assert "<tools>" not in render("hermes", ROUND_TRIP, None)


def test_deeply_nested_arguments_of_an_earlier_call_reach_the_template_as_text() -> None:
    deep = ToolCall(CALL.id, CALL.name, "[" * 100_000 + "]" * 100_000)
    messages = [ROUND_TRIP[0], {"role": "assistant", "content": "", "tool_calls": [deep]}]
    chat, _ = syntax_of(source(FAMILIES["hermes"])).prompt(messages, USE)
    assert chat[1]["tool_calls"][0]["function"]["arguments"] == deep.arguments


# What models of each family write (the calls as their templates show them).
ANSWERS = {
    "hermes": 'I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome", '
    '"hours24": true}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris \\"centre\\" {x}"}}',
    # [TOOL_CALLS] is a control token of Mistral's vocabularies: no text in the answer.
    "mistral": '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, '
    '{"name": "get_time", "arguments": {"city": "Rome", "hours24": true}, "id": "f5g6h7i8j"}]',
}


@pytest.mark.parametrize("family", sorted(ANSWERS))
def test_an_answer_reads_the_same_whole_and_piece_by_piece(family: str) -> None:
    syntax = syntax_of(source(FAMILIES[family]))
    whole = syntax.reader()
    whole.feed(ANSWERS[family])
    text, calls = whole.result()
    assert calls and calls[0].name == "get_weather"
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)
    pieces, streamed_text, named, arguments = syntax.reader(), "", [], {}
    for char in ANSWERS[family]:
        new_text, deltas = pieces.feed(char)
        streamed_text += new_text
        for index, name, part in deltas:
            if name is not None:
                assert index == len(named)  # a call's name comes first, once
                named.append(name)
            arguments[index] = arguments.get(index, "") + part
    assert pieces.finish() == ""
    assert (streamed_text or None) == text
    assert [(c.name, c.arguments) for c in calls] == [
        (n, arguments[i]) for i, n in enumerate(named)
    ]
    if family == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


@pytest.mark.parametrize(
    ("syntax", "answer"),
    [
        (syntax_of("<tool_call>"), "A tag that is not one: <tool"),
        (syntax_of("[TOOL_CALLS]"), "[a link](x) and [TOOL"),
        (syntax_of("<|start_header_id|>ipython<|end_header_id|>"), "No call {here}"),
    ],
)
def test_text_that_only_looks_like_a_call_is_text(syntax: ToolSyntax, answer: str) -> None:
    reader = syntax.reader()
    shown = "".join(reader.feed(char)[0] for char in answer)
    shown += reader.finish()  # an end held back in case it opened a call comes at the end
    assert shown == answer
    assert reader.result() == (answer, [])


def test_a_lazy_grammar_lets_text_pass_until_its_trigger_then_holds_the_call(
    model_path: Path,
) -> None:
    model = LlamaModel(model_path, n_ctx=256, n_seq=1, n_batch=32, threads=1)
    pool = GrammarPool(model_path, limit=1, memory=1 << 30, retry_after=1)
    try:
        constraint = syntax_of("<tool_call>").constraint(ToolUse(USE.tools, "auto"))
        assert constraint is not None and constraint.trigger
        grammar = Grammar(
            pool,
            constraint.to_gbnf(),
            param="tools",
            step_limit=0.25,
            hard_limit=1.0,
            trigger=constraint.trigger,
        )
        (hello,) = model.tokenize(" hello", add_special=False, parse_special=False)
        # Before the trigger: anything, text included.
        for token in model.tokenize("Let me check. ", add_special=False, parse_special=False):
            assert grammar.step(token, model.n_vocab) is True
        for token in model.tokenize("<tool_call>\n", add_special=False, parse_special=False):
            grammar.accept(token)
        # From the trigger on: only the call.
        allowed = grammar.step(hello, model.n_vocab)
        assert allowed is not True and not allowed[hello]
        (brace,) = model.tokenize("{", add_special=False, parse_special=False)
        assert allowed[brace]
        grammar.close()
        # Not lazy (tool_choice required): held from the first token.
        required = syntax_of("<tool_call>").constraint(ToolUse(USE.tools, "required"))
        assert required is not None and required.trigger is None
        held = Grammar(pool, required.to_gbnf(), param="tools", step_limit=0.25, hard_limit=1.0)
        assert held.step(hello, model.n_vocab) is not True
        held.close()
    finally:
        pool.close()
        model.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_node_with_the_template_calls_tools_in_its_syntax(
    start_server: Any, tmp_path: Path, family: str
) -> None:
    path = tmp_path / f"{FAMILIES[family]}.jinja"
    path.write_text(source(FAMILIES[family]))
    # Without prefix reuse: whole and streamed answers read their prompts alike.
    node: RunningServer = start_server(chat_template=str(path), reuse_prefix="false")
    wait_until(lambda: f"tool calls {family}" in node.log(), 10, "the log never named the syntax")
    [card] = httpx.get(node.url("/v1/models")).json()["data"]
    assert card["tool_call_syntax"] == family
    client = openai.OpenAI(base_url=node.url("/v1"), api_key="unused", max_retries=0)
    whole = create(
        client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments["city"], str)
        if family == "mistral":
            assert len(call.id) == 9 and call.id.isalnum()
    if family == "llama3":
        assert len(calls) == 1  # Llama 3.x calls one function at a time
    text, chunks, reason = streamed(
        client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96
    )
    assert reason == "tool_calls" and text == (choice.message.content or "")
    assert [(c["name"], c["arguments"]) for c in chunks] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    # The call and its result go back in the template's own form; with `auto` the answer is
    # text or, once the model opens a call, a valid call (the lazy grammar).
    conversation = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        *(
            {"role": "tool", "tool_call_id": c.id, "content": '{"temperature_c": 18}'}
            for c in calls
        ),
    ]
    final = create(client, messages=conversation, tools=[WEATHER], max_tokens=96)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    if family != "mistral":  # after Mistral's [/TOOL_RESULTS] the bundled model ends at once
        assert answer.message.content or answer.message.tool_calls
    for call in answer.message.tool_calls or ():
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
    text, chunks, reason = streamed(client, messages=conversation, tools=[WEATHER], max_tokens=96)
    assert (text, reason) == (answer.message.content or "", answer.finish_reason)
    assert [(c["name"], c["arguments"]) for c in chunks] == [
        (c.function.name, c.function.arguments) for c in answer.message.tool_calls or ()
    ]


def test_a_tool_definition_holding_a_control_tokens_text_is_refused(model_path: Path) -> None:
    model = LlamaModel(
        model_path,
        n_ctx=256,
        n_seq=1,
        n_batch=32,
        threads=1,
        chat_template=str(TEMPLATES / f"{FAMILIES['hermes']}.jinja"),
    )
    try:
        tool = {"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}
        with pytest.raises(InvalidRequest) as refused:
            model.chat_prompt([{"role": "user", "content": "hi"}], [tool])
        assert refused.value.param == "tools"
    finally:
        model.close()
