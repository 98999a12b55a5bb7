"""Which chat template a model's chats are rendered with, and rendering them.

In order: the CHAT_TEMPLATE setting (a Jinja file, or the name of a template llama.cpp has
built in); else the GGUF's own (`tokenizer.chat_template`); else, for a GGUF that has none, the
built-in template of its architecture's family (gemma3 → gemma), and for an architecture that
names none ChatML, as llama.cpp's server does for any model without a template.

A built-in name is rendered by llama.cpp itself (`llama_chat_apply_template`): the same text
llama.cpp's server makes for it, for every name llama.cpp knows (`llama_chat_builtin_templates`),
with no Jinja copy here to drift from it. A Jinja template (the GGUF's or a file) is rendered by
llama-cpp-python's Jinja2ChatFormatter, as before.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import llama_cpp as C
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import InvalidRequest, ModelError

# A Jinja template file larger than this is refused (real ones are a few kB, tool-using ones
# up to some tens of kB).
MAX_TEMPLATE_BYTES = 128 * 1024
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SETTING = "CHAT_TEMPLATE"

# general.architecture → llama.cpp's template for a GGUF of that architecture that carries
# none. Only architectures whose models all share one format: `llama` (Llama 2, Llama 3,
# Mistral, SmolLM, ...) is not one of them.
ARCHITECTURE_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "phi3": "phi3",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "command-r": "command-r",
    "cohere2": "command-r",
    "exaone": "exaone3",
    "exaone4": "exaone4",
    "granite": "granite",
    "minicpm": "minicpm",
    "orion": "orion",
    "gpt-oss": "gpt-oss",
    "rwkv6": "rwkv-world",
    "rwkv7": "rwkv-world",
}
DEFAULT_TEMPLATE = "chatml"  # llama.cpp's server's, for a model without a template


@lru_cache(maxsize=1)
def builtin_names() -> tuple[str, ...]:
    """The names of the templates llama.cpp has built in."""
    n = int(C.llama_chat_builtin_templates(None, 0))
    names = (ctypes.c_char_p * n)()
    n = int(C.llama_chat_builtin_templates(names, n))
    return tuple(sorted(bytes(names[i] or b"").decode() for i in range(n)))


class ChatTemplate:
    """Renders a conversation into the model's prompt text; `label` says which and whence,
    `source` is the Jinja text (None for a template llama.cpp renders)."""

    label: str
    source: str | None = None

    def render(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        raise NotImplementedError


class JinjaTemplate(ChatTemplate):
    def __init__(self, source: str, *, bos: str, eos: str, label: str) -> None:
        self.label = label
        self.source = source
        self._formatter = Jinja2ChatFormatter(template=source, eos_token=eos, bos_token=bos)

    def render(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        formatted = self._formatter(messages=cast(Any, list(messages)), tools=cast(Any, tools))
        return str(formatted.prompt)


class BuiltinTemplate(ChatTemplate):
    def __init__(self, name: str, *, label: str) -> None:
        self.name = name
        self.label = label

    def render(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        chat = (C.llama_chat_message * max(1, len(messages)))()
        keep = []  # the bytes the structs point to
        for i, message in enumerate(messages):
            role = str(message.get("role") or "").encode()
            try:
                content = str(message.get("content") or "").encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("the text is not valid UTF-8 (a lone surrogate)") from None
            if b"\0" in content:  # a C string would end there and lose the rest silently
                raise InvalidRequest("a message holds a NUL character", param="messages")
            keep += [role, content]
            chat[i].role = role
            chat[i].content = content
        size = 256 + 2 * sum(len(b) for b in keep)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = int(
                C.llama_chat_apply_template(
                    self.name.encode(), chat, len(messages), True, buf, size
                )
            )
            if n < 0:
                raise InvalidRequest(f"llama.cpp's {self.name} template rejected the messages")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1
        raise InvalidRequest(f"llama.cpp's {self.name} template rejected the messages")


def read_setting(value: str) -> tuple[str, str | None]:
    """CHAT_TEMPLATE's value as (name or path, the file's text if it is a path).

    A path has a `/` or ends in `.jinja`/`.j2`; anything else is a built-in name. Raises
    ModelError with a one-line reason: no such file, too large, not UTF-8, an unknown name.
    Called before the model loads, so a bad setting costs no load.
    """
    if "/" in value or value.endswith((".jinja", ".j2")):
        path = Path(value).expanduser()
        try:
            with path.open("rb") as file:
                data = file.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            raise ModelError(f"{SETTING} {value}: cannot read it ({exc.strerror or exc})") from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise ModelError(
                f"{SETTING} {value}: larger than {MAX_TEMPLATE_BYTES // 1024} KiB, not a chat "
                "template"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{SETTING} {value}: not UTF-8 text") from None
        if not text.strip():
            raise ModelError(f"{SETTING} {value}: the file is empty")
        return value, text
    if not NAME_PATTERN.match(value) or value not in builtin_names():
        raise ModelError(
            f"{SETTING} {value[:80]!r} is neither a file (a path with a / or ending in .jinja) "
            f"nor a template llama.cpp knows ({', '.join(builtin_names())})"
        )
    return value, None


def choose(
    setting: tuple[str, str | None] | None,
    *,
    gguf_template: str | None,
    architecture: str | None,
    bos: str,
    eos: str,
) -> ChatTemplate:
    """The template a model's chats use (see the module's doc). A Jinja file that does not
    compile, or cannot render one user message, raises ModelError."""
    if setting is not None:
        name, text = setting
        label = f"{name} (setting {SETTING})"
        if text is None:
            return BuiltinTemplate(name, label=label)
        try:
            template: ChatTemplate = JinjaTemplate(text, bos=bos, eos=eos, label=label)
            template.render([{"role": "user", "content": "Hello"}])
        except Exception as exc:  # jinja's TemplateSyntaxError, UndefinedError, ...
            reason = " ".join(f"{exc}".split())[:200]
            raise ModelError(f"{SETTING} {name}: not a usable chat template: {reason}") from None
        return template
    if gguf_template:
        if gguf_template in builtin_names():  # llama.cpp names one for a GGUF it recognises
            return BuiltinTemplate(gguf_template, label=f"{gguf_template} (chosen by llama.cpp)")
        return JinjaTemplate(
            gguf_template, bos=bos, eos=eos, label="the GGUF's own (tokenizer.chat_template)"
        )
    arch = architecture or "unknown"
    guess = ARCHITECTURE_TEMPLATES.get(arch)
    if guess is not None:
        return BuiltinTemplate(guess, label=f"{guess} (guessed from the architecture {arch})")
    return BuiltinTemplate(
        DEFAULT_TEMPLATE,
        label=f"{DEFAULT_TEMPLATE} (the default: the GGUF has none, and its architecture "
        f"{arch} names none)",
    )
