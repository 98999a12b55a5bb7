"""API keys (and a Hugging Face token) from OCI Vault secrets, into root-only files.

`gguf-appliance vault-secrets` reads the secrets the settings name (oci_api_key_secrets,
oci_hf_token_secret) with the SDK, signed as the instance, and writes:

- the key file: the SHA-256 of every key, as `sha256:` lines (keys.py reads them), so not even
  the root-only file holds a key;
- the token file: the Hugging Face token, for the fetch step (HF_TOKEN_PATH).

Each file is replaced whole (a new file, mode 0600, renamed over the old one) and only once every
secret has been read and checked: a Vault that cannot be reached, a secret that cannot be read or
that holds a bad line leaves the files as they were, and the command fails, so
`systemctl reload` fails and the keys in force stay. No secret's content is ever logged or put in
an error message; the secrets' OCIDs are.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .keys import MIN_KEY_LENGTH, key_digest
from .oci_auth import OciCredentials, client_options, import_oci, oci_credentials
from .settings import Settings

log = logging.getLogger("gguf_appliance.oci_secrets")

DEFAULT_KEY_FILE = Path("/etc/gguf-appliance/api-keys")
# Where `gguf-appliance install`'s fetch unit finds the Hugging Face token: systemd copies this
# root-only file into the unit's credentials.
DEFAULT_HF_TOKEN_FILE = Path("/etc/gguf-appliance/hf-token")


class VaultSecretError(Exception):
    """A secret could not be read or holds something else than expected (never its content)."""


SecretReader = Callable[[str], str]


def sdk_secret_reader(
    credentials: OciCredentials, endpoint: str | None, timeout: float = 10.0
) -> SecretReader:
    """Reads a secret's current version with the SDK's Secrets client, as text."""
    oci = import_oci()
    url = endpoint or f"https://secrets.vaults.{credentials.region}.oci.oraclecloud.com"
    client = oci.secrets.SecretsClient(
        credentials.config, **client_options(credentials, url, timeout)
    )

    def read(secret_id: str) -> str:
        try:
            bundle: Any = client.get_secret_bundle(secret_id, stage="CURRENT").data
        except oci.exceptions.ServiceError as exc:
            raise VaultSecretError(
                f"secret {secret_id}: the Vault answered {exc.status} {exc.code}"
            ) from None
        except Exception as exc:  # connection, timeout, signing
            raise VaultSecretError(
                f"secret {secret_id}: cannot reach the Vault ({type(exc).__name__})"
            ) from None
        content = bundle.secret_bundle_content
        if getattr(content, "content_type", None) != "BASE64" or not content.content:
            raise VaultSecretError(f"secret {secret_id}: no BASE64 content")
        try:
            return base64.b64decode(content.content, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise VaultSecretError(f"secret {secret_id}: its content is not UTF-8 text") from None

    return read


def key_lines(secret_id: str, text: str) -> list[str]:
    """A secret's keys as `sha256:HEX` lines (`batch:sha256:HEX` for a key marked batch: keys.py's
    form); a line that is no key fails (line number only)."""
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        mark = ""
        if key.startswith("batch:"):
            mark, key = "batch:", key.removeprefix("batch:")
        if key.startswith("sha256:") and len(key) == 71:
            try:
                bytes.fromhex(key[7:])
            except ValueError:
                pass
            else:
                lines.append(mark + key.lower())
                continue
        if len(key) < MIN_KEY_LENGTH or any(ch.isspace() for ch in key):
            raise VaultSecretError(
                f"secret {secret_id}, line {number}: a key is one word of at least "
                f"{MIN_KEY_LENGTH} characters, or sha256: and the key's 64 hex digits"
            )
        lines.append(mark + "sha256:" + key_digest(key).hex())
    return lines


@dataclass(frozen=True)
class VaultSecrets:
    api_key_secrets: tuple[str, ...]
    hf_token_secret: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultSecrets:
        return cls(tuple(settings.oci_api_key_secrets), settings.oci_hf_token_secret)

    def __bool__(self) -> bool:
        return bool(self.api_key_secrets or self.hf_token_secret)

    def write(self, read: SecretReader, key_file: Path, hf_token_file: Path) -> int:
        """Read every secret, then replace the files; the number of keys written."""
        keys: list[str] = []
        for secret_id in self.api_key_secrets:
            keys.extend(key_lines(secret_id, read(secret_id)))
        if self.api_key_secrets and not keys:
            raise VaultSecretError(
                "the API key secrets hold no key: "
                + ", ".join(self.api_key_secrets)
                + " (the key file is left as it was)"
            )
        token = None
        if self.hf_token_secret:
            token = read(self.hf_token_secret).strip()
            if not token or any(ch.isspace() for ch in token):
                raise VaultSecretError(f"secret {self.hf_token_secret}: not a Hugging Face token")
        if self.api_key_secrets:
            header = [
                "# gguf-appliance API keys, as SHA-256 digests, from OCI Vault secrets:",
                *(f"#   {secret_id}" for secret_id in self.api_key_secrets),
                "# Rewritten by `gguf-appliance vault-secrets` at start and on reload.",
            ]
            replace_file(key_file, "\n".join([*header, *dict.fromkeys(keys)]) + "\n")
        if token is not None:
            replace_file(hf_token_file, token + "\n")
        return len(dict.fromkeys(keys))


def replace_file(path: Path, text: str) -> None:
    """Write `text` to a new 0600 file beside `path` and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_vault_secrets(
    settings: Settings,
    key_file: Path = DEFAULT_KEY_FILE,
    hf_token_file: Path = DEFAULT_HF_TOKEN_FILE,
) -> int:
    """What `gguf-appliance vault-secrets` does: nothing when no secret is named."""
    secrets = VaultSecrets.from_settings(settings)
    if not secrets:
        log.info("no OCI Vault secret named: the key file is left as it is")
        return 0
    credentials = oci_credentials(
        settings.oci_auth,
        config_file=settings.oci_config_file,
        profile=settings.oci_config_profile,
        region=settings.oci_region,
    )
    read = sdk_secret_reader(
        credentials, settings.oci_secrets_endpoint, settings.oci_secrets_timeout
    )
    count = secrets.write(read, key_file, hf_token_file)
    if secrets.api_key_secrets:
        log.info("API keys from OCI Vault: %d written to %s (as digests)", count, key_file)
    if secrets.hf_token_secret:
        log.info("Hugging Face token from OCI Vault written to %s", hf_token_file)
    return count
