"""API keys: the bearer keys a request must carry, from the settings and a key file.

The key file holds one key a line; blank lines and lines starting with `#` are ignored. It is
read at start (a missing or unreadable file stops the node: an operator who named one meant
the node to be closed) and again on SIGHUP; a reload that fails keeps the keys in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("gguf_appliance.keys")

MIN_KEY_LENGTH = 16


class KeyFileError(Exception):
    """The key file cannot be read or holds a bad line (the message names the file and line)."""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"API key file not found: {path}") from None
    except PermissionError:
        raise KeyFileError(f"cannot read the API key file {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_LENGTH or any(ch.isspace() for ch in key):
            # The line itself is never logged: it may be a real key with a typo.
            raise KeyFileError(
                f"{path}, line {number}: a key is one word of at least {MIN_KEY_LENGTH} characters"
            )
        keys.append(key)
    return keys


class ApiKeys:
    """The keys in force. Checks compare SHA-256 digests in constant time, against every key,
    so neither the time taken nor a key's length tells anything about the keys."""

    def __init__(self, keys: Iterable[str] = (), key_file: Path | None = None) -> None:
        self._fixed = tuple(keys)
        self.key_file = key_file
        self._digests: tuple[bytes, ...] = ()
        self._install(read_key_file(key_file) if key_file else [])

    def _install(self, from_file: list[str]) -> None:
        self._digests = tuple(_digest(k.encode()) for k in {*self._fixed, *from_file})

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Read the key file again; on failure keep the keys in force. True if reloaded."""
        if self.key_file is None:
            log.info("SIGHUP: no API key file to reload (keys from the settings stay)")
            return False
        try:
            from_file = read_key_file(self.key_file)
        except KeyFileError as exc:
            log.error("API keys not reloaded, the %d in force stay: %s", len(self), exc)
            return False
        self._install(from_file)
        log.info("API keys reloaded from %s: %d in force", self.key_file, len(self))
        return True

    def authorized(self, authorization: bytes) -> bool:
        """True for an `Authorization` header value `Bearer KEY` naming a key in force."""
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        digest = _digest(token.strip())
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return matched
