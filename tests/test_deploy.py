"""The deployment files: cloud-init schema, systemd units, NGINX site, and `install`."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gguf_appliance.install import UNITS, InstallPlan, install, rendered_files
from gguf_appliance.keys import read_key_file
from gguf_appliance.resources import static_dir

from .nginx_runner import check_config, render_site

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def rendered_units(tmp_path: Path) -> dict[str, Path]:
    plan = InstallPlan(bin_dir=BIN, static_dir=static_dir())
    out = {}
    for path, text in rendered_files(plan).items():
        if path.name in UNITS:
            (tmp_path / path.name).write_text(text)
            out[path.name] = tmp_path / path.name
    return out


def test_cloud_init_passes_the_schema() -> None:
    result = subprocess.run(
        ["cloud-init", "schema", "-c", str(ROOT / "cloud-init.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_pins_every_runtime_dependency() -> None:
    text = (ROOT / "cloud-init.yaml").read_text()
    block = re.search(r"# pins:start\n(.*?)\n\s*# pins:end", text, re.S)
    assert block
    pins = {}
    for line in block.group(1).splitlines():
        req = Requirement(line.strip())
        assert str(req.specifier).startswith("=="), line
        pins.setdefault(req.name.lower().replace("_", "-"), []).append(req)
    for requirement in importlib.metadata.requires("gguf-appliance") or []:
        req = Requirement(requirement)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        assert req.name.lower().replace("_", "-") in pins, req.name
    assert "gguf-appliance" in pins and "llama-cpp-python" in pins
    assert "/tmp" not in text  # nothing is written under /tmp


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = rendered_units(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units.values())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_security_exposure_is_at_most_2_5(tmp_path: Path, unit: str) -> None:
    path = rendered_units(tmp_path)[unit]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5


def test_every_directive_sits_under_a_comment_saying_why() -> None:
    # Directives come in small groups; each group opens with its comment line.
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text()
        for block in text.split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip()]
            if lines and not lines[0].startswith("[") and "=" in block:
                assert lines[0].startswith("#"), f"{unit}: no comment above {lines[0]}"
            for i, line in enumerate(lines[1:], start=1):
                if line.startswith("["):
                    assert lines[i + 1].startswith("#"), f"{unit}: no comment after {line}"


def test_nginx_accepts_the_rendered_site(tmp_path: Path) -> None:
    conf = render_site(tmp_path, "127.0.0.1:18080", "127.0.0.1:18000", "10.0.0.0/16")
    result = check_config(conf)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_install_writes_once_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/nginx/sites-enabled").mkdir(parents=True)
    (root / "etc/nginx/sites-enabled/default").symlink_to("/etc/nginx/sites-available/default")
    plan = InstallPlan(bin_dir=BIN, static_dir=static_dir(), root=root)
    first = install(plan)
    assert any("gguf-appliance.service" in line for line in first)
    assert any("disabled" in line for line in first)
    assert not (root / "etc/nginx/sites-enabled/default").is_symlink()
    env_file = root / "etc/gguf-appliance/appliance.env"
    env_file.write_text("GGUF_APPLIANCE_N_SLOTS=2\n")  # the operator's edit survives
    assert install(plan) == []
    assert env_file.read_text() == "GGUF_APPLIANCE_N_SLOTS=2\n"
    unit = (root / "etc/systemd/system/gguf-appliance.service").read_text()
    assert f"ExecStart={BIN}/gguf-appliance serve" in unit
    site = (root / "etc/nginx/sites-available/gguf-appliance").read_text()
    assert f"root {static_dir()};" in site
    assert not re.search(r"@[A-Z_]+@", site)


def test_install_through_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "gguf-appliance"),
            "install",
            "--root",
            str(tmp_path),
            "--no-start",
            "--lb-subnet",
            "10.1.0.0/24",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    site = (tmp_path / "etc/nginx/sites-available/gguf-appliance").read_text()
    assert "set_real_ip_from 10.1.0.0/24;" in site
    assert shutil.which("systemd-analyze")


def test_install_writes_the_key_file_once_for_root_only(tmp_path: Path) -> None:
    plan = InstallPlan(bin_dir=BIN, static_dir=static_dir(), root=tmp_path)
    install(plan)
    key_file = tmp_path / "etc/gguf-appliance/api-keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "etc/gguf-appliance/appliance.env").stat().st_mode) == 0o600
    assert read_key_file(key_file) == []  # comments only: the API stays open
    key_file.write_text("k" * 32 + "\n")
    assert install(plan) == []
    assert read_key_file(key_file) == ["k" * 32]


def test_the_unit_stages_the_key_file_for_the_service_at_start_and_reload(tmp_path: Path) -> None:
    unit = rendered_units(tmp_path)["gguf-appliance.service"].read_text()
    stage = re.search(r"^ExecStartPre=\+/bin/sh -c '(.*)'$", unit, re.M)
    assert stage
    reloads = re.findall(r"^ExecReload=(.*)$", unit, re.M)
    assert reloads == [f"+/bin/sh -c '{stage[1]}'", "/bin/kill -HUP $MAINPID"]
    assert "Environment=GGUF_APPLIANCE_API_KEY_FILE=/run/gguf-appliance/api-keys" in unit
    assert "RuntimeDirectory=gguf-appliance" in unit
    # Run the shipped command with its two paths moved under tmp_path.
    source = tmp_path / "etc/api-keys"
    runtime = tmp_path / "run/gguf-appliance"
    runtime.mkdir(parents=True)
    command = stage[1].replace("/etc/gguf-appliance/api-keys", str(source))
    command = command.replace("/run/gguf-appliance", str(runtime))
    staged = runtime / "api-keys"

    subprocess.run(["/bin/sh", "-c", command], check=True)  # no key file yet: no keys
    assert staged.read_text() == ""
    source.parent.mkdir()
    source.write_text("# team\n" + "a" * 20 + "\n")
    source.chmod(0o600)
    subprocess.run(["/bin/sh", "-c", command], check=True)
    assert read_key_file(staged) == ["a" * 20]
    assert stat.S_IMODE(staged.stat().st_mode) == 0o400
    assert staged.stat().st_uid == runtime.stat().st_uid  # the service user's
    assert [p.name for p in runtime.iterdir()] == ["api-keys"]  # no half-written file left
