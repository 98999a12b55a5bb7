from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from gguf_appliance.cli import settings_markdown
from gguf_appliance.sources import sha256_of

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_appliance.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "GGUF_APPLIANCE_ENV_FILE": ""},
    )


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
