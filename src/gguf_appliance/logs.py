"""Log lines: text (logfmt-style fields) or one JSON object a line; journald priorities.

A record may carry structured data as `extra={"fields": {...}}`: the JSON format writes them as
keys of their own, the text format as `key=value` after the message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

# Values that need no quotes in the text format; anything else is written as a JSON string.
_BARE = re.compile(r"[^\s\"=]+")
# syslog priorities for journald's `<N>` line prefix (SyslogLevelPrefix=, on by default).
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _text_value(value: Any) -> str:
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    if isinstance(value, float | int | bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return json.dumps(value, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{k}={_text_value(v)}" for k, v in _fields(record).items() if v is not None]
        return " ".join([line, *pairs]) if pairs else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: journald and log shippers take it as it is."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalPriority(logging.Formatter):
    """Prefix `<N>` so journald files each line under its level (`journalctl -p err` works).

    journald makes one entry of each line: a text traceback's newlines are escaped so it stays
    one entry, with the error's priority.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record).replace("\n", "\\n")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"


def stderr_is_journal() -> bool:
    """True when stderr is journald's stream (systemd says so in $JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if stderr_is_journal():
        formatter = JournalPriority(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
