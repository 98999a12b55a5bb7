"""API keys and a Hugging Face token from OCI Vault secrets, read by the real `oci` SDK.

The Secrets endpoint is a stand-in: a local HTTP server on 127.0.0.1 (tests/oci_stand_in.py)
answering GetSecretBundle from a dict. The command signs with a throwaway API key from a config
file (oci_auth=config_file) instead of instance principals, whose metadata service and
certificates are not stood in here. systemd runs the same command at start and on reload
(systemd/gguf-appliance.service); here it is run directly, then the node's own key reload.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_appliance.cli import EXIT_TEMPORARY, main
from gguf_appliance.keys import ApiKeys, key_digest
from tests import oci_stand_in
from tests.oci_stand_in import Received, StandIn

KEYS_SECRET = "ocid1.vaultsecret.oc1..keys"
MORE_KEYS_SECRET = "ocid1.vaultsecret.oc1..morekeys"
TOKEN_SECRET = "ocid1.vaultsecret.oc1..hftoken"
KEY_A = "key-a-" + "x" * 20
KEY_B = "key-b-" + "y" * 20
TOKEN = "hf_standintoken1234567890"


class Vault:
    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.down = False
        self.hang = threading.Event()
        self.release = threading.Event()

    def answer(self, request: Received) -> tuple[int, Any]:
        if self.hang.is_set():
            self.release.wait(30)
        if self.down:
            return 503, {"code": "ServiceUnavailable", "message": "stand-in outage"}
        secret_id = request.path.split("?")[0].rsplit("/", 1)[-1]
        if secret_id not in self.secrets:
            return 404, {"code": "NotAuthorizedOrNotFound", "message": "no such secret"}
        content = base64.b64encode(self.secrets[secret_id].encode()).decode()
        return 200, {
            "secretId": secret_id,
            "versionNumber": 1,
            "stages": ["CURRENT", "LATEST"],
            "secretBundleContent": {"contentType": "BASE64", "content": content},
        }


@pytest.fixture
def vault() -> Iterator[tuple[Vault, StandIn]]:
    state = Vault()
    with oci_stand_in.running(state.answer) as stand_in:
        yield state, stand_in
        state.release.set()


def run(tmp_path: Path, url: str, **settings: str) -> int:
    config, _ = oci_stand_in.throwaway_oci_config(tmp_path)
    env = {
        "GGUF_APPLIANCE_OCI_AUTH": "config_file",
        "GGUF_APPLIANCE_OCI_CONFIG_FILE": str(config),
        "GGUF_APPLIANCE_OCI_SECRETS_ENDPOINT": url,
        **{f"GGUF_APPLIANCE_{k.upper()}": v for k, v in settings.items()},
    }
    env_file = tmp_path / "appliance.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return main(
        [
            "--env-file",
            str(env_file),
            "vault-secrets",
            "--key-file",
            str(tmp_path / "api-keys"),
            "--hf-token-file",
            str(tmp_path / "hf-token"),
        ]
    )


def test_keys_and_token_come_from_the_vault_into_root_only_files_never_logged(
    tmp_path: Path,
    vault: tuple[Vault, StandIn],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state, stand_in = vault
    batch_key = "batch-key-" + "z" * 20
    state.secrets = {
        KEYS_SECRET: f"{KEY_A}\n# a comment\nbatch:{batch_key}\n",
        TOKEN_SECRET: TOKEN + "\n",
    }
    caplog.set_level(logging.DEBUG)

    assert (
        run(
            tmp_path,
            stand_in.url,
            oci_api_key_secrets=KEYS_SECRET,
            oci_hf_token_secret=TOKEN_SECRET,
        )
        == 0
    )

    requests = stand_in.requests()
    assert sorted(r.path for r in requests) == sorted(
        f"/20190301/secretbundles/{s}?stage=CURRENT" for s in (KEYS_SECRET, TOKEN_SECRET)
    )
    assert all('keyId="ocid1.tenancy' in r.headers["authorization"] for r in requests)
    key_file, token_file = tmp_path / "api-keys", tmp_path / "hf-token"
    text = key_file.read_text()
    assert KEY_A not in text  # the file holds the key's digest, not the key
    assert f"sha256:{key_digest(KEY_A).hex()}" in text.splitlines()
    assert token_file.read_text() == TOKEN + "\n"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert token_file.stat().st_mode & 0o777 == 0o600
    keys = ApiKeys(key_file=key_file)
    assert keys.authorized(f"Bearer {KEY_A}".encode())
    # A key marked batch in the Vault stays a batch key (keys.py's `batch:sha256:` line).
    assert f"batch:sha256:{key_digest(batch_key).hex()}" in text.splitlines()
    digest = keys.match(f"Bearer {batch_key}".encode())
    assert digest is not None and keys.is_batch(digest)
    out = capsys.readouterr()
    for said in (caplog.text, out.out, out.err):
        assert KEY_A not in said and TOKEN not in said


def test_a_reload_takes_the_vaults_new_keys(tmp_path: Path, vault: tuple[Vault, StandIn]) -> None:
    state, stand_in = vault
    state.secrets = {KEYS_SECRET: KEY_A, MORE_KEYS_SECRET: ""}
    assert run(tmp_path, stand_in.url, oci_api_key_secrets=KEYS_SECRET) == 0
    keys = ApiKeys(key_file=tmp_path / "api-keys")
    assert keys.authorized(f"Bearer {KEY_A}".encode())

    # Rotation: key B added in a second secret, key A dropped; then what `systemctl reload`
    # does: the command again, then SIGHUP's reload of the key file.
    state.secrets = {KEYS_SECRET: "# rotated\n", MORE_KEYS_SECRET: KEY_B}
    assert run(tmp_path, stand_in.url, oci_api_key_secrets=f"{KEYS_SECRET},{MORE_KEYS_SECRET}") == 0
    assert keys.reload()
    assert keys.authorized(f"Bearer {KEY_B}".encode())
    assert not keys.authorized(f"Bearer {KEY_A}".encode())


@pytest.mark.parametrize("trouble", ["down", "hanging", "missing", "bad line", "no key"])
def test_a_vault_that_cannot_give_the_keys_leaves_the_key_file_as_it_was(
    trouble: str,
    tmp_path: Path,
    vault: tuple[Vault, StandIn],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state, stand_in = vault
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"{KEY_A}\n")
    secret = KEYS_SECRET
    state.secrets = {KEYS_SECRET: KEY_B}
    if trouble == "down":
        state.down = True
    elif trouble == "hanging":
        state.hang.set()  # answered only after the client's timeout (0.5 s here)
    elif trouble == "missing":
        secret = "ocid1.vaultsecret.oc1..gone"
    elif trouble == "bad line":
        state.secrets = {KEYS_SECRET: f"{KEY_B}\nshort\n"}
    else:
        state.secrets = {KEYS_SECRET: "# nothing here\n"}

    extra = {"oci_secrets_timeout": "0.5"} if trouble == "hanging" else {}
    assert run(tmp_path, stand_in.url, oci_api_key_secrets=secret, **extra) == EXIT_TEMPORARY

    assert key_file.read_text() == f"{KEY_A}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".api-keys")] == []
    err = capsys.readouterr().err
    assert "secrets not written, the files stay as they were" in err
    assert KEY_B not in err
