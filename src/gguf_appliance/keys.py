"""API keys: the bearer keys a request must carry, from the settings and a key file.

The key file holds one key a line, or `sha256:HEX`, the SHA-256 of a key (so the file, or the
user data that writes it, never holds the key itself); blank lines and lines starting with `#`
are ignored. A line that starts with `batch:` (`batch:KEY`, `batch:sha256:HEX`) gives a batch
key: its requests are of the batch traffic class (admitted after interactive ones, never on the
last slot) and have the batch key limits. It is read at start and again on SIGHUP.

Keys fail closed. A node given a key file never serves an open API: a file that is missing,
unreadable, holds a bad line or holds no key at all stops the node at start, and on SIGHUP
leaves the keys in force as they were. Only `open_api` lets a node run with no key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("gguf_appliance.keys")

MIN_KEY_LENGTH = 16
_DIGEST_LINE = re.compile(r"sha256:([0-9a-fA-F]{64})")
BATCH_PREFIX = "batch:"


class KeyFileError(Exception):
    """The key file cannot be read, holds a bad line or no key (the message names the file)."""


class OpenApiRefused(KeyFileError):
    """A node that listens beyond loopback has no API key, and open_api is off."""


def key_digest(key: str | bytes) -> bytes:
    """The SHA-256 of a key: what the node keeps and compares (`sha256:` lines give it in hex)."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def parse_key(line: str) -> tuple[bytes, bool] | None:
    """A key line's digest and whether it is a batch key; None for a malformed line."""
    batch = line.startswith(BATCH_PREFIX)
    key = line.removeprefix(BATCH_PREFIX)
    if digest := _DIGEST_LINE.fullmatch(key):
        return bytes.fromhex(digest[1]), batch
    if len(key) < MIN_KEY_LENGTH or any(ch.isspace() for ch in key):
        return None
    return key_digest(key), batch


def read_key_file(path: Path) -> list[bytes]:
    """The SHA-256 digests of the file's keys, in the file's order."""
    return [digest for digest, _ in read_keys(path)]


def read_keys(path: Path) -> list[tuple[bytes, bool]]:
    """The SHA-256 digests of the file's keys, each with its batch mark, in the file's order."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"API key file not found: {path}") from None
    except PermissionError:
        raise KeyFileError(f"cannot read the API key file {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc}") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        parsed = parse_key(key)
        if parsed is None:
            # The line itself is never logged: it may be a real key with a typo.
            raise KeyFileError(
                f"{path}, line {number}: a key is one word of at least {MIN_KEY_LENGTH} "
                "characters, or sha256: and the key's 64 hex digits (either after batch: "
                "for a batch key)"
            )
        digests.append(parsed)
    return digests


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ApiKeys:
    """The keys in force. Checks compare SHA-256 digests in constant time, against every key,
    so neither the time taken nor a key's length tells anything about the keys.

    With `open_api` off (the default) a key file that yields no key at all, counting the fixed
    keys too, is an error at start and a failed reload; with it on, no key means an open API.
    """

    def __init__(
        self, keys: Iterable[str] = (), key_file: Path | None = None, *, open_api: bool = False
    ) -> None:
        # A fixed key may be marked batch as a file's line is (`batch:KEY`).
        self._fixed = tuple(
            (key_digest(k.removeprefix(BATCH_PREFIX)), k.startswith(BATCH_PREFIX)) for k in keys
        )
        self.key_file = key_file
        self.open_api = open_api
        self._digests: tuple[bytes, ...] = ()
        self._batch: frozenset[bytes] = frozenset()
        if key_file is not None:
            self._install(self._checked(read_keys(key_file), key_file))
        else:
            self._install([])

    def _checked(
        self, from_file: list[tuple[bytes, bool]], key_file: Path
    ) -> list[tuple[bytes, bool]]:
        if not from_file and not self._fixed and not self.open_api:
            raise KeyFileError(
                f"the API key file {key_file} holds no key (only blank and comment lines): "
                "add one, or set GGUF_APPLIANCE_OPEN_API=true to serve without keys"
            )
        return from_file

    def _install(self, from_file: list[tuple[bytes, bool]]) -> None:
        keys = (*self._fixed, *from_file)
        self._digests = tuple(dict.fromkeys(digest for digest, _ in keys))
        self._batch = frozenset(digest for digest, batch in keys if batch)

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
            from_file = self._checked(read_keys(self.key_file), self.key_file)
        except KeyFileError as exc:
            log.error("API keys not reloaded, the %d in force stay: %s", len(self), exc)
            return False
        self._install(from_file)
        if self.required:
            log.info("API keys reloaded from %s: %d in force", self.key_file, len(self))
        else:
            log.warning("API keys reloaded from %s: none, the API is open", self.key_file)
        return True

    def authorized(self, authorization: bytes) -> bool:
        """True for an `Authorization` header value `Bearer KEY` naming a key in force."""
        return self.match(authorization) is not None

    def match(self, authorization: bytes) -> bytes | None:
        """The digest of the key in force an `Authorization` value `Bearer KEY` names, or None."""
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        digest = key_digest(token.strip())
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return digest if matched else None

    def is_batch(self, digest: bytes) -> bool:
        """True for the digest of a key marked `batch:`."""
        return digest in self._batch
