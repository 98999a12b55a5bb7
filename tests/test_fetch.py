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
import pytest

from gguf_appliance.errors import ModelError
from gguf_appliance.sources import fetch_model, parse_source, resolve_source, sha256_of

from .conftest import free_port
from .hub_server import TOKEN, HubServer, HubState


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
    hub.state.cut_once_at = None
    hub.state.corrupt_blobs.clear()
    hub.state.delay_per_chunk = 0.0
    values = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GGUF_APPLIANCE_MODELS_DIR": str(tmp_path / "models"),
        "GGUF_APPLIANCE_ENV_FILE": "",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
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
        "hf://acme/private/model.gguf": "HF_TOKEN is missing or lacks access",
        "hf://acme/gated/model.gguf": "acme/gated is gated: accept its licence",
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


def test_url_resumes_a_part_left_by_an_earlier_run(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    models = Path(env["GGUF_APPLIANCE_MODELS_DIR"])
    url = f"{hub.url}/files/{model_path.name}"
    dest = resolve_source(url, models)
    dest.parent.mkdir(parents=True)
    half = model_path.stat().st_size // 2
    dest.with_name(dest.name + ".part").write_bytes(model_path.read_bytes()[:half])
    info = fetch_model(url, models)
    assert sha256_of(info.path) == sha256_of(model_path)
    assert [r for _, _, r in hub.state.requests] == [f"bytes={half}-"]


def test_url_transfer_cut_midway_is_resumed(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.cut_once_at = 40_000_000
    info = fetch_model(f"{hub.url}/files/{model_path.name}", Path(env["GGUF_APPLIANCE_MODELS_DIR"]))
    assert sha256_of(info.path) == sha256_of(model_path)
    assert [r for _, _, r in hub.state.requests][1].startswith("bytes=")


def test_url_errors_are_one_line_and_leave_nothing(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/model.gguf"
    cases = {
        f"{hub.url}/files/absent.gguf": "not found (HTTP 404)",
        f"{hub.url}/forbidden/model.gguf": "access denied (HTTP 403)",
        closed: "cannot reach 127.0.0.1",
        f"{hub.url}/html/model.gguf": "not a GGUF file",
        f"{hub.url}/short/{model_path.name}": "truncated GGUF file",
    }
    for url, message in cases.items():
        assert message in one_line_error(cli(env, url)), url
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_full_disk_is_one_line_and_leaves_nothing(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    # RLIMIT_FSIZE stands in for a full disk: writes past 20 MB fail (EFBIG) as ENOSPC would.
    line = one_line_error(cli(env, f"{hub.url}/files/{model_path.name}", fsize_limit=20_000_000))
    assert "no space left to write" in line
    assert leftovers(Path(env["GGUF_APPLIANCE_MODELS_DIR"])) == []


def test_concurrent_fetches_wait_for_each_other(
    env: dict[str, str], hub: HubServer, model_path: Path
) -> None:
    hub.state.delay_per_chunk = 0.002
    url = f"{hub.url}/files/{model_path.name}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gguf_appliance.cli", "fetch", url],
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
        {**env, "GGUF_APPLIANCE_PROGRESS_INTERVAL": "1"}, f"{hub.url}/files/{model_path.name}"
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "gguf_appliance.fetch" in line]
    assert len(lines) >= 2, result.stderr
    assert all("\r" not in line for line in lines)
    assert any("B/s" in line and "%" in line for line in lines), lines
