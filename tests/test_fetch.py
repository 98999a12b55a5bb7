"""The model fetcher against a Hugging-Face-compatible server and plain URLs on 127.0.0.1."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest

from gguf_appliance.cli import EXIT_TEMPORARY
from gguf_appliance.downloads import download_url
from gguf_appliance.errors import ModelError
from gguf_appliance.progress import progress_class
from gguf_appliance.sources import (
    fetch_model,
    parse_source,
    redact_source,
    resolve_source,
    sha256_of,
)

from .conftest import RunningServer, free_port, wait_until
from .hub_server import COMMIT, TOKEN, HubServer, HubState

# Secrets a model URL may carry: in user:pass@, in its path (a pre-authenticated request) and in
# its query (a signed URL). None may show anywhere.
SECRETS = ("alice", "hunter2pw", "PARTOKEN0123456789", "SIGNATURE0123456789")


def split_model(model: Path, out_dir: Path) -> list[Path]:
    """The bundled model rewritten as a 3-part split GGUF (as llama.cpp's gguf-split makes)."""
    reader = gguf.GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out_dir / "smol.gguf", arch, split_max_tensors=100)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out_dir.glob("smol-*-of-00003.gguf"))


@pytest.fixture(scope="module")
def hub(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    state = HubState()
    state.add_file("acme/smol", "SmolLM2-135M-Instruct.Q4_1.gguf", model_path)
    state.add_file("acme/private", "model.gguf", model_path)
    state.private.add("acme/private")
    state.add_file("acme/gated", "model.gguf", model_path)
    state.gated.add("acme/gated")
    state.add_file("acme/licensed", "model.gguf", model_path)
    state.gated.add("acme/licensed")
    state.granted.add("acme/licensed")  # TOKEN's account accepted its licence
    for part in split_model(model_path, tmp_path_factory.mktemp("split")):
        state.add_file("acme/split", part.name, part)
    junk = tmp_path_factory.mktemp("junk") / "notes.gguf"
    junk.write_bytes(b"these are not the weights you are looking for\n" * 1000)
    state.add_file("acme/junk", "notes.gguf", junk)
    server = HubServer(state, free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def env(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    hub.state.requests.clear()
    hub.state.authorizations.clear()
    hub.state.cut_once_at = None
    hub.state.corrupt_blobs.clear()
    hub.state.delay_per_chunk = 0.0
    hub.state.fail_next = 0
    hub.state.fail_status = 503
    values = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GGUF_APPLIANCE_MODELS_DIR": str(tmp_path / "models"),
        "GGUF_APPLIANCE_ENV_FILE": "",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "CREDENTIALS_DIRECTORY",
        "GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    return values


def cli(
    env: dict[str, str],
    *args: str,
    fsize_limit: int | None = None,
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return subprocess.run(
        [sys.executable, "-m", "gguf_appliance.cli", "fetch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        preexec_fn=limit,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("gguf-appliance:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def leftovers(models: Path) -> list[Path]:
    """Model files in place or half-written (huggingface_hub's own cache aside)."""
    return [
        p
        for p in models.rglob("*")
        if p.is_file() and ".hf-cache" not in p.parts and not p.name.endswith(".lock")
    ]


def test_sources_parse() -> None:
    hf = parse_source("hf://TheBloke/TinyLlama-GGUF/sub/tinyllama.Q4_K_M.gguf@v1.0")
    assert (hf.kind, hf.location, hf.filename, hf.revision) == (
        "hf",
        "TheBloke/TinyLlama-GGUF",
        "sub/tinyllama.Q4_K_M.gguf",
        "v1.0",
    )
    assert parse_source("https://objectstorage.example/p/x/o/model.gguf").kind == "url"
    assert parse_source("file:///srv/m.gguf").location == "/srv/m.gguf"
    assert parse_source("/srv/m.gguf").kind == "file"
    for bad in ("hf://only/two.gguf", "hf://a/b/c.bin", "hf://a/../c.gguf", "s3://bucket/m.gguf"):
        with pytest.raises(ModelError):
            parse_source(bad)


def test_hub_download_is_verified_placed_and_not_repeated(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    source = "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
    info = fetch_model(source, models)
    assert info.path == resolve_source(source, models)
    assert info.path == models / "hf/acme/smol/main/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_of(info.path) == sha256_of(model_path)
    assert info.architecture == "llama"
    assert any(path.startswith("/cdn/") for _, path, _ in hub.state.requests)
    hub.state.requests.clear()
    again = fetch_model(source, models)
    assert again.path == info.path
    assert hub.state.requests == []  # present and verified: no network at all


def test_hub_transfer_cut_midway_is_resumed_with_range(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.cut_once_at = 30_000_000
    result = cli(
        env, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf@" + "0123456789abcdef" * 2 + "01234567"
    )
    assert result.returncode == 0, result.stderr
    ranges = [r for method, path, r in hub.state.requests if path.startswith("/cdn/") and r]
    assert ranges and int(ranges[0].removeprefix("bytes=").split("-")[0]) > 0
    assert sha256_of(Path(result.stdout.strip())) == sha256_of(model_path)


def test_hub_split_model_fetches_every_part_and_loads(
    env: dict[str, str], start_server: object
) -> None:
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    info = fetch_model("hf://acme/split/smol-00002-of-00003.gguf", models)
    parts = sorted((models / "hf/acme/split/main").glob("smol-*.gguf"))
    assert [p.name for p in parts] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert 130_000_000 < info.parameters < 140_000_000  # all parts counted
    # llama.cpp loads a split model from its first part.
    node = start_server(model=str(parts[0]))  # type: ignore[operator]
    import httpx

    reply = httpx.post(
        node.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 3}, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_hub_errors_are_one_line_and_leave_nothing(env: dict[str, str], tmp_path: Path) -> None:
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    cases = {
        "hf://nobody/nothing/model.gguf": "repository nobody/nothing not found",
        "hf://acme/smol/missing.gguf": "file not found: missing.gguf in acme/smol",
        "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf@nope": "revision nope not found",
        "hf://acme/private/model.gguf": (
            "repository acme/private not found, or it is private, and no Hugging Face token was "
            "given: give a token: HF_TOKEN, or a file named by HF_TOKEN_PATH"
        ),
        "hf://acme/gated/model.gguf": "acme/gated is gated, and no Hugging Face token was given",
        "hf://acme/junk/notes.gguf": "not a GGUF file",
    }
    for source, message in cases.items():
        assert message in one_line_error(cli(env, source)), source
    closed = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    line = one_line_error(cli(closed, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert "cannot reach the Hub at http://127.0.0.1:" in line
    assert leftovers(models) == []


def test_private_repo_with_hf_token(env: dict[str, str]) -> None:
    result = cli({**env, "HF_TOKEN": TOKEN}, "hf://acme/private/model.gguf")
    assert result.returncode == 0, result.stderr


VAULT_SECRET = "ocid1.vaultsecret.oc1..hftoken"


def token_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_gated_model_comes_with_the_token_file_hf_token_path_names(
    env: dict[str, str], hub: HubServer, tmp_path: Path
) -> None:
    source = "hf://acme/licensed/model.gguf"
    line = one_line_error(cli(env, source))
    assert "acme/licensed is gated, and no Hugging Face token was given" in line
    assert "GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET" in line and "HF_TOKEN_PATH" in line
    assert hub.state.authorizations == [None]
    # A file of blank lines (what the fetch unit gets when there is no token file) is no token.
    blank = token_file(tmp_path / "blank", "\n")
    line = one_line_error(cli({**env, "HF_TOKEN_PATH": str(blank)}, source))
    assert "no Hugging Face token was given" in line

    hub.state.authorizations.clear()
    path = token_file(tmp_path / "hf-token", TOKEN + "\n")
    result = cli({**env, "HF_TOKEN_PATH": str(path)}, source)
    assert result.returncode == 0, result.stderr
    assert set(hub.state.authorizations) == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.stdout + result.stderr


def test_the_fetch_units_credential_is_named_when_the_hub_refuses_its_token(
    env: dict[str, str], tmp_path: Path
) -> None:
    # As the fetch unit runs it: the token in its credentials directory (systemd's copy of
    # /etc/gguf-appliance/hf-token), HF_TOKEN_PATH naming it, the Vault secret in the settings.
    credentials = tmp_path / "credentials"
    path = credentials / "hf-token"
    unit = {
        **env,
        "CREDENTIALS_DIRECTORY": str(credentials),
        "HF_TOKEN_PATH": str(path),
        "GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET": VAULT_SECRET,
    }
    named = (
        f"the Hugging Face token from /etc/gguf-appliance/hf-token (the fetch unit's credential "
        f"{path}, from the OCI Vault secret {VAULT_SECRET})"
    )
    wrong = "hf_not_a_token_the_hub_knows"
    token_file(path, wrong + "\n")
    result = cli(unit, "hf://acme/licensed/model.gguf")
    line = one_line_error(result)
    assert result.returncode == 1
    assert f"the Hub refused {named} (HTTP 401): it is not a valid token" in line
    assert wrong not in result.stdout + result.stderr

    token_file(path, TOKEN + "\n")
    result = cli(unit, "hf://acme/gated/model.gguf")  # a licence this account has not accepted
    line = one_line_error(result)
    assert result.returncode == 1
    assert f"acme/gated is gated, and {named} has no access to it: accept acme/gated's" in line
    assert TOKEN not in result.stdout + result.stderr
    result = cli(unit, "hf://acme/licensed/model.gguf")
    assert result.returncode == 0, result.stderr

    # The Vault's secret is named but no token came (gguf-appliance-secrets failed): a failure
    # that may pass (75), so the unit tries again, and starts the secrets unit again with it.
    token_file(path, "\n")
    result = cli(unit, "hf://acme/private/model.gguf")
    line = one_line_error(result)
    assert result.returncode == EXIT_TEMPORARY
    assert (
        f"no Hugging Face token reached the fetch, though GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET "
        f"names {VAULT_SECRET}: gguf-appliance-secrets writes it to /etc/gguf-appliance/hf-token "
        f"(see journalctl -u gguf-appliance-secrets)"
    ) in line
    # Trying again within the same run cannot bring the token (it comes with the unit's start):
    # --retry-for exits 75 at once, without a retry.
    result = cli(unit, "hf://acme/private/model.gguf", *quick_retries())
    assert result.returncode == EXIT_TEMPORARY
    assert "no Hugging Face token reached the fetch" in one_line_error(result)
    assert RETRY_LOGGED not in result.stderr


def test_hf_token_in_the_environment_goes_before_the_token_file(
    env: dict[str, str], hub: HubServer, tmp_path: Path
) -> None:
    # HF_TOKEN in /etc/gguf-appliance/appliance.env reaches the fetch as an environment variable
    # (systemd reads the file): it still works, and huggingface_hub takes it before the file.
    stale = token_file(tmp_path / "hf-token", "hf_stale_token_in_the_file\n")
    both = {**env, "HF_TOKEN": TOKEN, "HF_TOKEN_PATH": str(stale)}
    result = cli(both, "hf://acme/licensed/model.gguf")
    assert result.returncode == 0, result.stderr
    assert set(hub.state.authorizations) == {f"Bearer {TOKEN}"}
    line = one_line_error(cli({**both, "HF_TOKEN": "hf_wrong"}, "hf://acme/private/model.gguf"))
    assert "the Hub refused the Hugging Face token from HF_TOKEN (HTTP 401)" in line


def test_a_token_file_that_cannot_be_read_is_named(env: dict[str, str], tmp_path: Path) -> None:
    # Not huggingface_hub's PermissionError, which would read as a cache that cannot be written.
    directory = tmp_path / "not-a-file"
    directory.mkdir()
    line = one_line_error(cli({**env, "HF_TOKEN_PATH": str(directory)}, "hf://acme/smol/x.gguf"))
    assert f"cannot read the Hugging Face token file {directory} (HF_TOKEN_PATH)" in line


def test_hub_corrupt_transfer_fails_the_hubs_checksum(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.corrupt_blobs.add(sha256_of(model_path))
    line = one_line_error(cli(env, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert "checksum mismatch" in line
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_url_download_follows_redirects_and_checks_sha256(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    digest = sha256_of(model_path)
    url = f"{hub.url}/redirect/{model_path.name}"
    result = cli(env, url, "--sha256", digest)
    assert result.returncode == 0, result.stderr
    placed = Path(result.stdout.strip())
    assert placed.name == model_path.name and sha256_of(placed) == digest
    wrong = one_line_error(cli(env, f"{hub.url}/files/{model_path.name}", "--sha256", "0" * 64))
    assert "checksum mismatch" in wrong


def half_downloaded(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> tuple[Path, str, Path, int]:
    """A .part holding the first half of the model, as a run cut off midway leaves it: the models
    directory, the file's URL, where it goes, and the bytes already there."""
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    url = f"{hub.url}/files/{model_path.name}"
    dest = resolve_source(url, models)
    dest.parent.mkdir(parents=True)
    half = model_path.stat().st_size // 2
    dest.with_name(dest.name + ".part").write_bytes(model_path.read_bytes()[:half])
    return models, url, dest, half


def test_url_resumes_a_part_left_by_an_earlier_run(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    models, url, _, half = half_downloaded(env, hub, model_path)
    info = fetch_model(url, models, sha256=sha256_of(model_path))
    assert sha256_of(info.path) == sha256_of(model_path)
    assert [r for _, _, r in hub.state.requests] == [f"bytes={half}-"]


def test_url_transfer_cut_midway_is_resumed(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.cut_once_at = 40_000_000
    info = fetch_model(
        f"{hub.url}/files/{model_path.name}",
        Path(env["GGUF_APPLIANCE_MODELS_DIR"]),
        sha256=sha256_of(model_path),
    )
    assert sha256_of(info.path) == sha256_of(model_path)
    assert [r for _, _, r in hub.state.requests][1].startswith("bytes=")


def test_url_errors_are_one_line_and_leave_nothing(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/model.gguf"
    cases = {
        f"{hub.url}/files/absent.gguf": "not found (HTTP 404)",
        f"{hub.url}/forbidden/model.gguf": "access denied (HTTP 403)",
        closed: f"cannot reach {closed.split('/')[2]}: ",
        f"{hub.url}/html/model.gguf": "not a GGUF file",
        f"{hub.url}/short/{model_path.name}": "truncated GGUF file",
    }
    for url, message in cases.items():
        result = cli(env, url, "--sha256", "0" * 64)  # plain http:// needs one
        assert message in one_line_error(result), url
        # Only what may pass exits 75, the status the fetch unit retries.
        assert result.returncode == (75 if url == closed else 1), url
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_full_disk_is_one_line_and_leaves_nothing(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    # RLIMIT_FSIZE stands in for a full disk: writes past 20 MB fail (EFBIG) as ENOSPC would.
    url = f"{hub.url}/files/{model_path.name}"
    line = one_line_error(cli(env, url, "--sha256", "0" * 64, fsize_limit=20_000_000))
    assert "no space left to write" in line
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_concurrent_fetches_wait_for_each_other(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.delay_per_chunk = 0.002
    url = f"{hub.url}/files/{model_path.name}"
    digest = sha256_of(model_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.cli", "fetch", url, "--sha256", digest],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert len({out for out, _ in outputs}) == 1
    assert sha256_of(Path(outputs[0][0].strip())) == sha256_of(model_path)
    gets = [path for method, path, _ in hub.state.requests if method == "GET"]
    assert len(gets) == 1  # one download; the others found it fetched and verified


def test_progress_is_logged_in_lines_when_not_on_a_terminal(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.delay_per_chunk = 0.01  # ~4 s for the file
    result = cli(
        {**env, "GGUF_APPLIANCE_PROGRESS_INTERVAL": "1"},
        f"{hub.url}/files/{model_path.name}",
        "--sha256",
        sha256_of(model_path),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "gguf_appliance.fetch" in line]
    assert len(lines) >= 2, result.stderr
    assert all("\r" not in line for line in lines)
    assert any("B/s" in line and "%" in line for line in lines), lines


def test_sources_that_would_write_outside_the_models_dir_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    bad = [
        "hf://acme/smol/m.gguf@../../../tmp/evil",
        "hf://acme/smol/m.gguf@/tmp/evil",
        "hf://acme/smol/m.gguf@main/../../x",
        "hf://acme/smol/m.gguf@",
        "hf://acme/smol/m.gguf@main\x00",
        "hf://acme/smol/sub/./m.gguf",
        "hf://acme/smol/sub\\..\\m.gguf",
        "hf://acme/smol/m\x00.gguf",
        "hf://../smol/m.gguf",
        "hf://acme/.../m.gguf",
        "/srv/m\x00.gguf",
        "https://example.com/a/../m.gguf",
    ]
    for source in bad:
        with pytest.raises(ModelError):
            resolve_source(source, models)
        with pytest.raises(ModelError):
            fetch_model(source, models)
    assert not models.exists()
    for revision in ("v1.0", COMMIT, "refs/pr/1"):
        path = resolve_source(f"hf://acme/smol/sub/m.gguf@{revision}", models)
        assert path.is_relative_to(models / "hf" / "acme" / "smol") and path.name == "m.gguf"


def test_a_url_that_names_no_gguf_file_is_refused(tmp_path: Path) -> None:
    for url in (
        "https://objectstorage.example/p/PARTOKEN0123456789/n/ns/b/models/o/model",
        "https://example.com/download?file=model.gguf",
        "https://example.com/",
        "https://example.com",
    ):
        with pytest.raises(ModelError, match=r"the URL must name a \.gguf file") as caught:
            resolve_source(url, tmp_path)
        assert "PARTOKEN" not in caught.value.message


def test_plain_http_without_a_sha256_is_refused_before_any_request(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    line = one_line_error(cli(env, f"{hub.url}/files/{model_path.name}"))
    assert "refusing plain http:// without a sha256" in line
    assert hub.state.requests == []
    result = cli(env, f"{hub.url}/files/{model_path.name}", "--sha256", sha256_of(model_path))
    assert result.returncode == 0, result.stderr


def test_a_redirect_to_plain_http_is_refused_without_a_sha256(
    hub: HubServer, model_path: Path, tmp_path: Path
) -> None:
    # The hook that refuses the first request's http:// refuses a redirect's the same way.
    part = tmp_path / "m.gguf.part"
    with pytest.raises(ModelError, match="refusing plain http:// without a sha256"):
        download_url(
            f"{hub.url}/redirect/{model_path.name}", part, progress_class(10), https_only=True
        )
    assert not part.exists()


def test_a_changed_sha256_checks_the_fetched_file_again(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    url = f"{hub.url}/files/{model_path.name}"
    digest = sha256_of(model_path)
    first = cli(env, url, "--sha256", digest)
    assert first.returncode == 0, first.stderr
    placed = Path(first.stdout.strip())
    hub.state.requests.clear()
    line = one_line_error(cli(env, url, "--sha256", "0" * 64))
    assert f"checksum mismatch for {model_path.name}: expected {'0' * 64}" in line
    assert f"has {digest}" in line
    assert placed.exists()  # the file stays: the setting may be what is wrong
    again = cli(env, url, "--sha256", digest.upper())
    assert again.returncode == 0, again.stderr
    assert hub.state.requests == []  # checked where it is, never fetched again


def test_a_hub_file_verified_by_the_hubs_sha256_is_checked_against_a_configured_one(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    source = "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cli(env, source).returncode == 0
    line = one_line_error(cli(env, source, "--sha256", "f" * 64))
    assert "checksum mismatch" in line
    assert cli(env, source, "--sha256", sha256_of(model_path)).returncode == 0


def test_redact_source_keeps_scheme_host_and_file_name_only() -> None:
    url = (
        "https://alice:hunter2pw@objectstorage.example:8443/p/PARTOKEN0123456789/n/ns/b/models"
        "/o/model.Q4_K_M.gguf?sig=SIGNATURE0123456789"
    )
    assert redact_source(url) == "https://objectstorage.example:8443/.../model.Q4_K_M.gguf?..."
    assert redact_source("https://example.com/m.gguf") == "https://example.com/m.gguf"
    assert redact_source("s3://AKIAKEY:SECRETKEY@bucket/m.gguf") == "s3://bucket/m.gguf"
    assert redact_source(f"https://example.com/{'a' * 200}") == "https://example.com/..."
    for plain in ("bundled:smollm2-135m-instruct-q4_1", "hf://acme/smol/m.gguf@v1", "/srv/m.gguf"):
        assert redact_source(plain) == plain


def test_a_url_with_credentials_is_fetched_into_a_directory_without_them(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    host = hub.url.removeprefix("http://")
    url = f"http://alice:hunter2pw@{host}/files/{model_path.name}?sig=SIGNATURE0123456789"
    result = cli(env, url, "--sha256", sha256_of(model_path))
    assert result.returncode == 0, result.stderr
    placed = Path(result.stdout.strip())
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    assert placed.is_relative_to(models / "url" / host.replace(":", "_"))
    shown = result.stdout + result.stderr + "\n".join(map(str, models.rglob("*")))
    assert not [secret for secret in SECRETS if secret in shown], shown


def test_fetch_errors_show_a_url_without_its_secrets(env: dict[str, str], hub: HubServer) -> None:
    host = hub.url.removeprefix("http://")
    url = f"http://alice:hunter2pw@{host}/p/PARTOKEN0123456789/absent.gguf?sig=SIGNATURE0123456789"
    result = cli({**env, "GGUF_APPLIANCE_LOG_LEVEL": "debug"}, url, "--sha256", "0" * 64)
    line = one_line_error(result)
    assert f"not found (HTTP 404): http://{host}/.../absent.gguf?..." in line
    assert not [secret for secret in SECRETS if secret in result.stderr], result.stderr
    denied = url.replace("/p/", "/forbidden/").replace("/PARTOKEN0123456789", "")
    result = cli(env, denied, "--sha256", "0" * 64)
    assert f"access denied (HTTP 403) by {host}: " in one_line_error(result)
    assert not [secret for secret in SECRETS if secret in result.stderr], result.stderr


def test_health_ready_shows_a_failed_fetch_without_the_urls_secrets(
    env: dict[str, str], hub: HubServer, tmp_path: Path
) -> None:
    host = hub.url.removeprefix("http://")
    url = f"http://alice:hunter2pw@{host}/p/PARTOKEN0123456789/absent.gguf?sig=SIGNATURE0123456789"
    node = RunningServer(
        {**env, "GGUF_APPLIANCE_MODEL": url, "GGUF_APPLIANCE_MODEL_SHA256": "0" * 64},
        tmp_path / "node.log",
    )
    try:
        node.wait_live()

        def failed() -> bool:
            return bool(
                httpx.get(node.url("/health/ready"), timeout=5).json()["status"] == "failed"
            )

        wait_until(failed, 60, "the failed fetch never showed on /health/ready")
        ready = httpx.get(node.url("/health/ready"), timeout=5).json()
        assert ready["reason"] == f"not found (HTTP 404): http://{host}/.../absent.gguf?..."
        models = httpx.get(node.url("/v1/models"), timeout=5).text
        shown = f"{ready}{models}{node.log()}"
        assert not [secret for secret in SECRETS if secret in shown], shown
    finally:
        node.stop()


# --- retries within one run (`fetch --retry-for`, as the fetch unit runs it) ---


def quick_retries(retry_for: str = "120") -> tuple[str, ...]:
    """Short waits for the tests; the unit's are 5 s doubling to 5 min."""
    return ("--retry-for", retry_for, "--retry-delay", "0.05", "--retry-max-delay", "0.2")


RETRY_LOGGED = "giving up"  # in each retry's log line


def retries_logged(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if RETRY_LOGGED in line]


def test_a_hub_failing_for_a_while_is_tried_again_within_one_run(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.fail_next = 3
    result = cli(env, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf", *quick_retries())
    assert result.returncode == 0, result.stderr
    assert hub.state.fail_next == 0
    logged = retries_logged(result)
    assert len(logged) == 3, result.stderr
    assert all("the Hub answered HTTP 503" in line for line in logged), logged
    assert sha256_of(Path(result.stdout.split()[0])) == sha256_of(model_path)
    assert "Traceback" not in result.stderr


def test_without_retry_for_a_503_exits_75_at_once(env: dict[str, str], hub: HubServer) -> None:
    hub.state.fail_next = 1
    result = cli(env, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result.returncode == EXIT_TEMPORARY
    assert "the Hub answered HTTP 503" in one_line_error(result)
    assert retries_logged(result) == []


def test_a_retry_resumes_the_part_already_downloaded(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    # A transfer cut off (the client's own resumes used up: a server that then answers 503 for a
    # while) leaves its .part; the next try within the run asks for the rest only, as a new start
    # of the unit would.
    _, url, dest, half = half_downloaded(env, hub, model_path)
    hub.state.fail_next = 2
    result = cli(env, url, "--sha256", sha256_of(model_path), *quick_retries())
    assert result.returncode == 0, result.stderr
    assert len(retries_logged(result)) == 2, result.stderr
    assert [r for _, _, r in hub.state.requests] == [f"bytes={half}-"] * 3
    assert sha256_of(dest) == sha256_of(model_path)
    assert not dest.with_name(dest.name + ".part").exists()


def test_what_will_not_pass_is_not_tried_again(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    # With waits of 30 s, any retry would show as a run that takes 30 s; these take none.
    slow = ("--retry-for", "600", "--retry-delay", "30", "--retry-max-delay", "30")
    cases = [
        (("hf://acme/smol/absent.gguf",), "file not found"),
        ((f"{hub.url}/files/absent.gguf", "--sha256", "0" * 64), "not found (HTTP 404)"),
        ((f"{hub.url}/files/{model_path.name}", "--sha256", "0" * 64), "checksum mismatch"),
        ((f"{hub.url}/forbidden/model.gguf", "--sha256", "0" * 64), "access denied (HTTP 403)"),
    ]
    for args, message in cases:
        hub.state.requests.clear()
        result = cli(env, *args, *slow)
        assert result.returncode == 1, (args, result.stderr)
        assert message in one_line_error(result), args
        assert retries_logged(result) == [], args
        # One try: the Hub's HEAD and GET of one resolve, or one GET of a file.
        assert len({path for _, path, _ in hub.state.requests}) == 1, hub.state.requests
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_the_retries_end_at_their_deadline_with_75(env: dict[str, str], hub: HubServer) -> None:
    hub.state.fail_next = 10_000
    result = cli(env, "hf://acme/smol/SmolLM2-135M-Instruct.Q4_1.gguf", *quick_retries("1"))
    assert result.returncode == EXIT_TEMPORARY
    assert "the Hub answered HTTP 503" in one_line_error(result)
    assert len(retries_logged(result)) >= 2, result.stderr
