"""grammar.py: the price check every request grammar passes before llama.cpp sees it."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator

import llama_cpp as C
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import JSON_GBNF

from gguf_appliance.engine import Engine
from gguf_appliance.errors import InvalidRequest
from gguf_appliance.grammar import check_gbnf, check_schema, schema_to_gbnf

ARITHMETIC = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*   # a comment
"""


def refused(text: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check_gbnf(text)
    assert caught.value.param == "grammar"
    return caught.value.message


def test_everyday_grammars_pass() -> None:
    check_gbnf(JSON_GBNF)
    check_gbnf(ARITHMETIC)
    check_gbnf('root ::= "yes" | "no"')
    check_gbnf('root ::= [^\\x00-\\x1F"]{1,20} <[2]>')
    check_gbnf('root ::= (\n  "a"\n  | "b"\n)*')


def test_deep_nesting_is_refused_without_recursion() -> None:
    # 40,000 nested groups in 80 kB: llama.cpp's parser would recurse 80,000 frames deep.
    message = refused("root ::= " + "(" * 40_000 + '"a"' + ")" * 40_000)
    assert "nests groups more than 1024 deep" in message


def test_a_repeated_long_literal_is_refused_before_it_is_copied() -> None:
    # 40 kB of text that llama.cpp would copy out 2,000 times: 80 M grammar elements.
    message = refused('root ::= "' + "a" * 40_000 + '"{2000}')
    assert "expands to more than" in message


def test_nested_repetitions_are_refused_as_llama_cpp_would() -> None:
    assert "repeats too many rules" in refused('root ::= (("a"{0,60}){0,60})')
    assert "more than 2000 times" in refused('root ::= "a"{3000}')


def test_thousands_of_alternatives_are_refused() -> None:
    text = "root ::= " + " | ".join(f'"w{i}"' for i in range(5000))
    assert "more than 4096 alternatives" in refused(text)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('root ::= "a" other', "undefined rule 'other'"),
        ('start ::= "a"', "no 'root' rule"),
        ('root ::= "\\q"', "unknown escape"),
        ('root ::= "\\x4"', "hex digits"),
        ('root ::= ("a"', "expects ')'"),
        ('root ::= "a" )', "new line or the end"),
        ("root ::= *", "nothing before it"),
        ('root ::= "a"{2', "expects '}'"),
        ('root ::= "a\x00"', "NUL"),
        ('root ::= "a"\n"b"', "rule name"),
    ],
)
def test_malformed_grammars_say_what_is_wrong(text: str, said: str) -> None:
    assert said in refused(text)


def test_a_huge_pattern_repetition_is_refused_before_conversion() -> None:
    schema = {"type": "string", "pattern": "^a{300000000}$"}
    with pytest.raises(InvalidRequest) as caught:
        schema_to_gbnf(schema)
    assert caught.value.param == "response_format"
    assert "repeats something 300000000 times" in caught.value.message


def test_nested_pattern_repetitions_multiply() -> None:
    with pytest.raises(InvalidRequest, match="expands to more than"):
        check_schema({"pattern": "((ab){500}){500}"}, param="response_format")


def test_everyday_schemas_convert() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "country": {"enum": [f"country {i}" for i in range(250)]},
        },
        "required": ["name", "code"],
    }
    assert "root ::=" in schema_to_gbnf(schema)


# --- agreement with llama.cpp's own parser -----------------------------------------------------

_ITEMS = st.sampled_from(
    ['"a"', '"\\x41"', '"\\q"', "[a-z]", "[^\\n]", "[]", ".", "x", "y", "<[5]>", "!<[6]>", "<a"]
)
_OPS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "{,2}", "{2,}", "{", "}", "{x}"])


@st.composite
def _sequences(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        if depth < 3 and draw(st.integers(0, 4)) == 0:
            inner = " | ".join(draw(_sequences(depth + 1)) for _ in range(draw(st.integers(1, 3))))
            close = draw(st.sampled_from([")", ")", ""]))
            parts.append(f"({inner}{close}")
        else:
            parts.append(draw(_ITEMS))
        parts.append(draw(_OPS))
    return " ".join(parts)


@st.composite
def _grammars(draw: st.DrawFn) -> str:
    rules = []
    for name in draw(st.lists(st.sampled_from(["root", "x", "y"]), min_size=1, max_size=3)):
        body = " | ".join(draw(_sequences()) for _ in range(draw(st.integers(1, 2))))
        rules.append(f"{name} ::= {body}")
    return draw(st.sampled_from(["\n", "\r\n", " "])).join(rules)


@pytest.fixture
def llama_log() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("gguf_appliance.llama")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_grammars())
def test_the_check_agrees_with_llama_cpp(engine: Engine, llama_log: list[str], text: str) -> None:
    """Whatever the check passes, llama.cpp parses (it may still refuse a left-recursive
    grammar, which it says in its log, not on stderr); whatever the check refuses for its
    syntax, llama.cpp refuses too."""
    assert engine.model is not None
    try:
        engine.model.check_grammar(text)
        ours = True
    except InvalidRequest:
        ours = False
    del llama_log[:]
    pointer = C.llama_sampler_init_grammar(engine.model.vocab, text.encode(), b"root")
    theirs = bool(pointer)
    if pointer:
        C.llama_sampler_free(ctypes.c_void_p(pointer) if isinstance(pointer, int) else pointer)
    if ours and not theirs:
        assert any("left recursion" in line for line in llama_log), (text, llama_log)
    if theirs and not ours:
        # Stricter than llama.cpp on purpose: it keeps the last of two definitions of a rule.
        with pytest.raises(InvalidRequest, match="twice"):
            engine.model.check_grammar(text)


def test_sizes_add_up_over_the_schema_and_multiply_through_nested_arrays() -> None:
    # Each keyword within bounds; together 60 M characters of grammar.
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "minLength": 10_000} for i in range(6000)},
    }
    nested = {
        "type": "array",
        "minItems": 100,
        "items": {"type": "array", "minItems": 100, "items": {"type": "string", "maxLength": 100}},
    }
    for schema in (wide, nested):
        with pytest.raises(InvalidRequest, match="multiplied through nested arrays"):
            check_schema(schema, param="response_format")
