from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Turns a sequence of token byte pieces into text that is safe to show as it arrives.

    A UTF-8 character split across tokens is held until its last byte comes, and text that
    could be the start of a stop string is held until it is known not to be one, so the pieces
    this emits, joined, equal the text of the whole generation cut before the first stop string.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self.position = 0  # characters decoded so far, shown or held (where the next begins)

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be shown now."""
        if self.stopped:
            return ""
        decoded = self._decoder.decode(piece)
        self.position += len(decoded)
        self._pending += decoded
        return self._release()

    def flush(self) -> str:
        """End of generation: return all that is still held (never a stop string).

        The bytes of a character cut off by the end of generation are dropped, not shown as
        U+FFFD: the answer ends before the character it did not finish.
        """
        if self.stopped:
            return ""
        self._decoder.reset()
        text = self._release()
        if not self.stopped:
            text += self._pending
            self._pending = ""
        return text

    def _release(self) -> str:
        pending = self._pending
        if not self._stop:
            self._pending = ""
            return pending
        found = [(i, s) for s in self._stop if (i := pending.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            self.stopped = True
            self._pending = ""
            return pending[:cut]
        hold = self._held_suffix(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def _held_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
