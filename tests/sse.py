"""Server-sent events for the tests: the WHATWG parser, fed as text arrives.

Lines end at CRLF, LF or CR and nowhere else (not at U+2028 or U+0085, where Python's
str.splitlines and so httpx's iter_lines would cut). A CR at the end of a chunk may be half of a
CRLF, so it waits for the next chunk.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import httpx

_LINE_END = re.compile(r"\r\n|\r|\n")
_Text = TypeVar("_Text", str, bytes)


def cut_at(data: _Text, cuts: Iterable[int]) -> list[_Text]:
    """`data` in pieces, cut at the given offsets (taken modulo its length), as a network may."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


class EventStreamParser:
    def __init__(self) -> None:
        self._buffer = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Add text; return the (event, data) pairs it completes."""
        self._buffer += text
        done = []
        position = 0
        for end in _LINE_END.finditer(self._buffer):
            if end.group() == "\r" and end.end() == len(self._buffer):
                break
            line = self._buffer[position : end.start()]
            position = end.end()
            event = self._line(line)
            if event is not None:
                done.append(event)
        self._buffer = self._buffer[position:]
        return done

    def _line(self, line: str) -> tuple[str, str] | None:
        if line == "":
            event, data = self._event or "message", self._data
            self._event, self._data = "", []
            return (event, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None  # a comment: the keep-alive pings
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


def parse(chunks: Iterable[str]) -> list[tuple[str, str]]:
    parser = EventStreamParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, JSON data) pairs as they arrive; `data: [DONE]` comes as the string."""
    parser = EventStreamParser()
    for chunk in response.iter_text():
        for event, data in parser.feed(chunk):
            yield event, data if data == "[DONE]" else json.loads(data)
