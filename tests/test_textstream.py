from __future__ import annotations

from gguf_appliance.textstream import TextStream


def pieces_of(text: str, size: int) -> list[bytes]:
    data = text.encode("utf-8")
    return [data[i : i + size] for i in range(0, len(data), size)]


def run(stream: TextStream, pieces: list[bytes]) -> list[str]:
    out = [stream.push(p) for p in pieces]
    out.append(stream.flush())
    return out


def test_multibyte_characters_split_across_pieces_are_never_emitted_broken() -> None:
    text = "日本語のテキスト 🙂👍🏽 café"
    for size in (1, 2, 3, 5):
        out = run(TextStream(), pieces_of(text, size))
        assert "".join(out) == text
        assert all("\ufffd" not in part for part in out)


def test_character_cut_off_by_the_end_is_dropped_not_replaced() -> None:
    stream = TextStream()
    emoji = "🙂".encode()
    assert stream.push(b"ok " + emoji[:2]) == "ok "
    assert stream.flush() == ""


def test_invalid_bytes_in_the_middle_become_replacement_characters() -> None:
    assert "".join(run(TextStream(), [b"a\xffb"])) == "a\ufffdb"


def test_stop_string_within_one_piece_cuts_the_text_before_it() -> None:
    stream = TextStream(["STOP"])
    assert stream.push(b"hello STOP world") == "hello "
    assert stream.stopped
    assert stream.push(b"more") == ""
    assert stream.flush() == ""


def test_stop_string_split_across_pieces_is_held_then_cut() -> None:
    stream = TextStream(["</end>"])
    assert stream.push(b"answer </") == "answer "
    assert stream.push(b"en") == ""
    assert stream.push(b"d> tail") == ""
    assert stream.stopped


def test_text_held_as_a_possible_stop_is_released_when_it_is_not_one() -> None:
    stream = TextStream(["</end>"])
    assert stream.push(b"a </e") == "a "
    assert stream.push(b"x") == "</ex"
    assert stream.push(b" </") == " "
    assert stream.flush() == "</"


def test_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(["world", "lo w"])
    assert stream.push(b"hello world") == "hel"
