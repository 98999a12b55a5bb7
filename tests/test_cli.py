from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest

from gguf_appliance.cli import settings_markdown
from gguf_appliance.errors import ModelError
from gguf_appliance.gguf_file import inspect_gguf
from gguf_appliance.server import spinning_openmp
from gguf_appliance.sources import sha256_of

from .conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "GGUF_APPLIANCE_ENV_FILE": "", **(env or {})},
    )


def small_gguf(path: Path, **metadata: Any) -> Path:
    """A GGUF file of llama architecture with one small tensor and the given metadata."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        key = key.replace("__", ".")
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_info_prints_the_models_metadata() -> None:
    result = cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama"
    assert info["quantization"] == "Q4_1"
    assert info["context_length"] == 8192
    assert info["has_chat_template"] is True
    assert 130_000_000 < info["parameters"] < 140_000_000


def test_fetch_bundled_prints_its_path(model_path: Path) -> None:
    result = cli("fetch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(model_path)


def test_fetch_with_the_right_checksum_passes_and_a_wrong_one_fails(model_path: Path) -> None:
    digest = sha256_of(model_path)
    assert cli("fetch", str(model_path), "--sha256", digest).returncode == 0
    bad = cli("fetch", str(model_path), "--sha256", "0" * 64)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "checksum mismatch" in bad.stderr


def test_fetch_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"<html>not found</html>")
    result = cli("fetch", f"file://{junk}")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"not a GGUF file (bad magic b'<htm'): {junk}")


def test_fetch_refuses_a_truncated_file(tmp_path: Path, model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:50_000_000])
    result = cli("fetch", str(cut))
    assert result.returncode == 1
    assert "truncated GGUF file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_bundled_model_names_the_known_ones() -> None:
    result = cli("info", "bundled:llama-70b")
    assert result.returncode == 1
    assert "smollm2-135m-instruct-q4_1" in result.stderr


def test_readme_lists_every_setting_as_the_code_does() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block, "README.md lacks the settings table markers"
    assert block.group(1).strip() == settings_markdown().strip()


def test_settings_masks_api_keys_and_a_models_url_secrets() -> None:
    keys = ["first-key-0123456789-AAAA", "second-key-0123456789-BBBB"]
    url = (
        "https://alice:hunter2pw@objectstorage.example/p/PARTOKEN0123456789/n/ns/b/m/o/"
        "model.gguf?sig=SIGNATURE0123456789"
    )
    result = cli(
        "settings", env={"GGUF_APPLIANCE_API_KEYS": ",".join(keys), "GGUF_APPLIANCE_MODEL": url}
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["api_keys"] == ["***AAAA", "***BBBB"]
    assert shown["model"] == "https://objectstorage.example/.../model.gguf?..."
    for secret in [*keys, "alice", "hunter2pw", "PARTOKEN", "SIGNATURE"]:
        assert secret not in result.stdout


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (
            {"llama__context_length": "4096"},
            "llama.context_length should be an integer, not string",
        ),
        ({"general__file_type": "Q4_0"}, "general.file_type should be an integer, not string"),
        ({"general__name": 7}, "general.name should be a string, not uint32"),
    ],
)
def test_wrong_typed_gguf_metadata_is_one_clear_line(
    tmp_path: Path, metadata: dict[str, Any], message: str
) -> None:
    model = small_gguf(tmp_path / "odd.gguf", **metadata)
    with pytest.raises(ModelError, match=message):
        inspect_gguf(model)
    result = cli("info", str(model))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"gguf-appliance: bad GGUF metadata in {model}: {message}"


def test_well_typed_small_gguf_is_read(tmp_path: Path) -> None:
    model = small_gguf(tmp_path / "ok.gguf", llama__context_length=4096, general__name="tiny")
    info = inspect_gguf(model)
    assert (info.context_length, info.name, info.architecture) == (4096, "tiny", "llama")


def test_serve_with_wrong_typed_metadata_says_why_on_ready_and_stays_up(
    tmp_path: Path, start_server: Callable[..., Any]
) -> None:
    model = small_gguf(tmp_path / "odd.gguf", llama__context_length="4096")
    node = start_server(ready=False, model=str(model))
    node.wait_live()

    def loaded() -> bool:
        return bool(httpx.get(node.url("/health/ready"), timeout=5).json()["status"] != "loading")

    wait_until(loaded, 30, "the model never stopped loading")
    ready = httpx.get(node.url("/health/ready"), timeout=5)
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "failed",
        "reason": f"bad GGUF metadata in {model}: llama.context_length should be an integer, "
        "not string",
    }
    node.wait_live()  # up and saying why; no restart would help
    assert node.process.poll() is None
    assert "Traceback" not in node.log()


def test_serve_warns_of_openmp_workers_that_would_spin_while_idle(
    tmp_path: Path, start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model that fails to load: the node stays up and never decodes, so the spinning
    # workers this warns of are never started here.
    monkeypatch.setenv("OMP_WAIT_POLICY", "Active")
    model = small_gguf(tmp_path / "odd.gguf", llama__context_length="4096")
    node = start_server(ready=False, model=str(model))
    node.wait_live()
    assert "OMP_WAIT_POLICY=active: llama.cpp's worker threads will spin" in node.log()
    assert spinning_openmp({"GOMP_SPINCOUNT": "INFINITE"}) == "GOMP_SPINCOUNT=infinite"
    assert spinning_openmp({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "300000"}) is None
    assert spinning_openmp({}) is None
