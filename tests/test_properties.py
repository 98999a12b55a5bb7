"""Properties, checked by hypothesis: the UTF-8 streaming decoder and the event stream framing."""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gguf_appliance.api.endpoint import event_json
from gguf_appliance.api.sse import PING, frame
from gguf_appliance.textstream import TextStream

from .sse import cut_at, parse


def stream(pieces: list[bytes], stop: Sequence[str] = ()) -> tuple[list[str], TextStream]:
    text = TextStream(stop)
    out = [text.push(piece) for piece in pieces]
    out.append(text.flush())
    return out, text


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@settings(max_examples=300)
@given(st.binary(max_size=300), cuts)
@example(b"\xe3\x81\x82\xf0\x9f\x99\x82", [1, 2, 4, 5, 6])
@example(b"\xe3\x81A\xff\xf0\x9f", [1, 2, 3])
def test_bytes_split_anywhere_decode_like_the_whole(data: bytes, at: list[int]) -> None:
    whole, _ = stream([data])
    pieces, _ = stream(cut_at(data, at))
    assert "".join(pieces) == "".join(whole)
    # The whole, as Python decodes it, less a character the end cut off (it is dropped).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert "".join(pieces) == decoder.decode(data, final=False)


@settings(max_examples=300)
@given(st.text(max_size=200), cuts)
def test_valid_utf8_split_anywhere_is_the_text_with_no_broken_character(
    text: str, at: list[int]
) -> None:
    pieces, _ = stream(cut_at(text.encode(), at))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


@settings(max_examples=300)
@given(
    st.text(max_size=120),
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
    cuts,
)
@example("hello </end> tail", ["</end>"], [7, 9, 10])
@example("aab", ["ab"], [1])
@example("日本語のテキスト", ["テキ"], [13, 14])
def test_stop_strings_are_found_across_any_token_boundary(
    text: str, stops: list[str], at: list[int]
) -> None:
    pieces, stream_state = stream(cut_at(text.encode(), at), stops)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(found)] if found else text
    assert "".join(pieces) == expected
    assert stream_state.stopped == bool(found)


def test_text_held_back_is_only_a_possible_stop_start() -> None:
    # Nothing is held that cannot begin a stop string: a streamed answer does not lag.
    text = TextStream(["STOP"])
    assert text.push(b"a S") == "a "
    assert text.push(b"x") == "Sx"


# --- the event stream ---

token_text = st.text(max_size=60)
line_breaks = st.sampled_from(["\r\n", "\r", "\n"])


@settings(max_examples=300)
@given(token_text, cuts)
@example("line\nbreak\r\nand\rcr", [3, 11])
@example("\u2028\u2029\x85 separators", [1])
def test_a_token_event_survives_any_chunking(text: str, at: list[int]) -> None:
    encoded = frame(event_json({"text": text}), "token").decode()
    events = parse(cut_at(encoded, at))
    assert len(events) == 1
    event, data = events[0]
    assert event == "token"
    assert json.loads(data) == {"text": text}


@given(
    st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n")), min_size=1),
    line_breaks,
)
def test_multi_line_data_comes_back_joined_by_newlines(lines: list[str], br: str) -> None:
    encoded = frame(br.join(lines), "x").decode()
    assert parse([encoded]) == [("x", "\n".join(lines))]


@given(token_text)
@example("a\u2028b")
@example("\x85")
def test_a_client_that_splits_lines_like_python_also_reads_every_token(text: str) -> None:
    # httpx's iter_lines (and str.splitlines) also break at U+2028, U+2029, U+0085 and more:
    # the server's JSON escapes those, so such clients read each event whole too.
    encoded = frame(event_json({"text": text}), "token").decode()
    data = [line[6:] for line in encoded.splitlines() if line.startswith("data: ")]
    assert len(data) == 1
    assert json.loads(data[0]) == {"text": text}


@settings(max_examples=50)
@given(st.lists(token_text, max_size=6), cuts)
def test_a_whole_stream_of_events_parses_back_in_order(texts: list[str], at: list[int]) -> None:
    frames = "".join(frame(event_json({"text": t}), "token").decode() for t in texts)
    frames += PING.decode() + frame("[DONE]").decode()
    events = parse(cut_at(frames, at))
    assert [json.loads(d)["text"] for e, d in events if e == "token"] == texts
    assert events[-1] == ("message", "[DONE]")
