"""The deployment files: cloud-init schema, systemd units, NGINX site, and `install`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.metadata
import itertools
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from gguf_appliance.install import UNITS, InstallPlan, install, rendered_files
from gguf_appliance.keys import ApiKeys, key_digest, read_key_file
from gguf_appliance.resources import static_dir
from gguf_appliance.settings import DEFAULT_MODEL
from gguf_appliance.sources import resolve_source

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


def directives_without_a_why(text: str) -> list[str]:
    """The directive lines of a unit file that no comment explains.

    A comment covers the directive lines directly under it, up to the next blank line, section
    header or comment: each directive's nearest line above that is not a directive must be a
    comment saying something ("#" alone or a "# --- heading ---" says nothing).
    """
    missing = []
    explained = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("["):
            explained = False
        elif stripped.startswith(("#", ";")):
            words = stripped.lstrip("#; ")
            explained = bool(words) and not re.fullmatch(r"-+ .* -+", words)
        elif not explained:  # anything else is a directive (or a line systemd would reject)
            missing.append(line)
    return missing


def test_every_directive_sits_under_a_comment_saying_why() -> None:
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text()
        assert directives_without_a_why(text) == [], unit


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("[Service]\n# Why.\nType=notify\nNotifyAccess=main\n", []),
        ("[Service]\n# Why,\n# and more.\nType=notify\n", []),
        ("[Service]\nType=notify\n", ["Type=notify"]),
        ("[Service]\n# Why.\nType=notify\n\nNotifyAccess=main\n", ["NotifyAccess=main"]),
        ("# Why.\n[Service]\nType=notify\n", ["Type=notify"]),
        ("[Service]\n# --- who it runs as ---\nUser=x\n", ["User=x"]),
        ("[Service]\n#\nUser=x\n", ["User=x"]),
        (
            "[Service]\n# Why.\n[Install]\nWantedBy=multi-user.target\n",
            ["WantedBy=multi-user.target"],
        ),
    ],
)
def test_the_comment_check_names_each_directive_with_no_why(text: str, missing: list[str]) -> None:
    assert directives_without_a_why(text) == missing


@pytest.mark.parametrize("unit", UNITS)
def test_the_comment_check_catches_a_broken_copy_of_each_unit(tmp_path: Path, unit: str) -> None:
    lines = (ROOT / "systemd" / unit).read_text().splitlines()
    # A directive added after a blank line, away from any comment.
    (tmp_path / "added").write_text("\n".join([*lines, "", "Nice=5"]) + "\n")
    assert directives_without_a_why((tmp_path / "added").read_text()) == ["Nice=5"]
    # A one-line comment opening a group after a blank line or section header, taken away.
    opening = [
        i
        for i in range(1, len(lines) - 1)
        if lines[i].startswith("#")
        and (not lines[i - 1] or lines[i - 1].startswith("["))
        and not lines[i + 1].startswith("#")
    ]
    i = opening[-1]
    group = list(itertools.takewhile(lambda line: line and line[0] not in "#[", lines[i + 1 :]))
    (tmp_path / "removed").write_text("\n".join(lines[:i] + lines[i + 1 :]) + "\n")
    uncovered = directives_without_a_why((tmp_path / "removed").read_text())
    assert uncovered == group and group, lines[i]


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
    made = read_key_file(key_file)  # a new key: the node needs one to start
    assert len(made) == 1
    assert install(plan) == []
    assert read_key_file(key_file) == made  # written once, never replaced
    key_file.write_text("k" * 32 + "\n")
    assert install(plan) == []
    assert read_key_file(key_file) == [key_digest("k" * 32)]


def unit_command(unit: str, directive: str) -> str:
    """The one `DIRECTIVE=+/bin/sh -euc '...'` script of a unit, as systemd hands it to sh."""
    (script,) = re.findall(rf"^{directive}=\+/bin/sh -euc '(.*)'$", unit, re.M)
    return str(script).replace("$$", "$")


def test_the_unit_stages_the_key_file_for_the_service_at_start_and_reload(tmp_path: Path) -> None:
    unit = rendered_units(tmp_path)["gguf-appliance.service"].read_text()
    stage = unit_command(unit, "ExecStartPre")
    assert unit_command(unit, "ExecReload") == stage
    # First the key file from the Vault, by the unit that may reach it (this one may not).
    secrets = "+/bin/systemctl start gguf-appliance-secrets.service"
    assert re.findall(r"^ExecStartPre=(.*)$", unit, re.M)[0] == secrets
    reloads = re.findall(r"^ExecReload=(.*)$", unit, re.M)
    assert reloads[0] == secrets
    assert reloads[2:] == ["/bin/kill -HUP $MAINPID"]
    assert "Environment=GGUF_APPLIANCE_API_KEY_FILE=/run/gguf-appliance-keys/api-keys" in unit
    assert "RuntimeDirectory=gguf-appliance" in unit
    assert "ExecStopPost=+/bin/rm -rf /run/gguf-appliance-keys" in unit

    # Run the shipped script with its paths moved under tmp_path.
    source = tmp_path / "etc/api-keys"
    runtime = tmp_path / "run/gguf-appliance"  # the service user's
    staging = tmp_path / "run/gguf-appliance-keys"  # root's
    runtime.mkdir(parents=True)
    script = stage.replace("/etc/gguf-appliance/api-keys", str(source))
    script = script.replace("/run/gguf-appliance-keys", "@STAGING@")
    script = script.replace("/run/gguf-appliance", str(runtime)).replace("@STAGING@", str(staging))
    staged = staging / "api-keys"

    def run_stage() -> int:
        return subprocess.run(["/bin/sh", "-euc", script], capture_output=True).returncode

    assert run_stage() != 0  # no key file: no start, and a reload fails
    assert list(staging.iterdir()) == []  # nothing half-written left behind
    source.parent.mkdir()
    source.write_text("# team\n" + "a" * 20 + "\n")
    source.chmod(0o600)
    assert run_stage() == 0
    assert read_key_file(staged) == [key_digest("a" * 20)]
    assert stat.S_IMODE(staged.stat().st_mode) == 0o400
    assert staged.stat().st_uid == runtime.stat().st_uid  # the service user's
    assert stat.S_IMODE(staging.stat().st_mode) == 0o711
    source.write_text("b" * 20 + "\n")
    assert run_stage() == 0
    assert read_key_file(staged) == [key_digest("b" * 20)]
    assert [p.name for p in staging.iterdir()] == ["api-keys"]  # replaced whole


def test_the_key_staging_writes_through_nothing_the_service_user_planted(tmp_path: Path) -> None:
    unit = rendered_units(tmp_path)["gguf-appliance.service"].read_text()
    script = unit_command(unit, "ExecStartPre")
    source = tmp_path / "etc/api-keys"
    source.parent.mkdir()
    source.write_text("c" * 20 + "\n")
    runtime = tmp_path / "run/gguf-appliance"
    runtime.mkdir(parents=True)
    # What a compromised service could leave in the directory it owns: links to root's files.
    victim = tmp_path / "etc/shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    for name in ("api-keys", "api-keys.new", "api-keys.tmp"):
        (runtime / name).symlink_to(victim)
    if os.geteuid() == 0:
        os.chown(runtime, 65534, 65534)  # as under systemd: the service user's directory
    script = script.replace("/etc/gguf-appliance/api-keys", str(source))
    script = script.replace("/run/gguf-appliance-keys", "@STAGING@")
    script = script.replace("/run/gguf-appliance", str(runtime))
    script = script.replace("@STAGING@", str(tmp_path / "run/gguf-appliance-keys"))
    subprocess.run(["/bin/sh", "-euc", script], check=True)
    assert victim.read_text() == "root:secret\n"
    assert victim.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    staged = tmp_path / "run/gguf-appliance-keys/api-keys"
    assert not staged.is_symlink()
    assert staged.stat().st_uid == runtime.stat().st_uid
    assert staged.parent.stat().st_uid == os.geteuid()  # root's, not the service user's


SERVE_FROM_READ_ONLY = """
import sys
from pathlib import Path
from gguf_appliance.sources import fetch_model
print(fetch_model(sys.argv[1], Path(sys.argv[2]), sha256=sys.argv[3]).path)
"""


def test_only_the_fetch_unit_may_write_the_models(tmp_path: Path) -> None:
    units = {name: path.read_text() for name, path in rendered_units(tmp_path).items()}
    node, fetch = units.pop("gguf-appliance.service"), units.pop("gguf-appliance-fetch.service")
    for unit in (node, fetch):
        assert "StateDirectory=gguf-appliance\n" in unit  # the same user and directory
    read_only = "ReadOnlyPaths=/var/lib/gguf-appliance /var/lib/private/gguf-appliance\n"
    assert read_only in node
    assert "ReadOnlyPaths" not in fetch
    assert "ReadWritePaths" not in node + fetch
    # The OCI helpers: a read-only system; the Vault's writes the key and token files only.
    assert set(units) == {"gguf-appliance-secrets.service", "gguf-appliance-oci-metrics.service"}
    for name, unit in units.items():
        assert "StateDirectory" not in unit and "ProtectSystem=strict\n" in unit
        writable = re.findall(r"^ReadWritePaths=(.*)$", unit, re.M)
        assert writable == (["/etc/gguf-appliance"] if "secrets" in name else [])


def test_a_fetched_model_loads_from_a_read_only_models_dir(tmp_path: Path) -> None:
    # The fetch unit fetches and verifies; the node, whose models directory is read-only, only
    # finds the model again (load_configured_model calls fetch_model with the same source).
    model = resolve_source(DEFAULT_MODEL)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(model, served / "model.gguf")
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        source = f"http://127.0.0.1:{hub.server_address[1]}/model.gguf"
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        fetch = [sys.executable, "-c", SERVE_FROM_READ_ONLY, source, str(models_dir), digest]
        fetched = subprocess.run(fetch, capture_output=True, text=True, check=True).stdout
        hub.shutdown()
    read_only = (
        f'mount --bind "{models_dir}" "{models_dir}" && '
        f'mount -o remount,bind,ro "{models_dir}" && exec "$@"'
    )
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*unshare, "sh", "-c", read_only, "sh", "true"], capture_output=True)
    # Root (CI, `make test` as root) or unprivileged user namespaces; no skip: a missing
    # capability must show, not hide the test.
    assert probe.returncode == 0, f"no read-only bind mount here: {probe.stderr.decode()}"
    loaded = subprocess.run(
        [*unshare, "sh", "-c", read_only, "sh", *fetch], capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout == fetched


def first_boot_key_step(tmp_path: Path) -> str:
    """The bootstrap's step that writes the API key file, writing under tmp_path instead."""
    config = yaml.safe_load((ROOT / "cloud-init.yaml").read_text())
    (bootstrap,) = [f for f in config["write_files"] if f["path"].endswith("bootstrap")]
    step = re.search(
        r"^KEYS=/etc/gguf-appliance/api-keys\n.*?^fi\n", bootstrap["content"], re.M | re.S
    )
    assert step, "no key step in the bootstrap"
    return step[0].replace("/etc/gguf-appliance/api-keys", str(tmp_path / "api-keys"))


def test_the_bootstrap_is_valid_sh_and_bakes_only_when_asked(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "cloud-init.yaml").read_text())
    files = {f["path"]: f["content"] for f in config["write_files"]}
    script = tmp_path / "bootstrap"
    script.write_text(files["/usr/local/sbin/gguf-appliance-bootstrap"])
    checked = subprocess.run(["/bin/sh", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # The user data's own setting is no bake: only deploy/oci's builder turns it on.
    assert re.search(r"^GGUF_APPLIANCE_BAKE=no$", files["/etc/gguf-appliance/bootstrap.env"], re.M)
    # cloud-init installs no package itself (its packages module updates apt's lists on every
    # new instance, which a node booted from a baked image must not wait for).
    assert "packages" not in config and "package_update" not in config


def test_the_first_boot_makes_a_key_for_root_only_when_none_is_given(tmp_path: Path) -> None:
    step = first_boot_key_step(tmp_path)
    subprocess.run(["/bin/sh", "-euc", step], check=True, env={"PATH": os.environ["PATH"]})
    key_file = tmp_path / "api-keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    (key,) = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    assert len(key) >= 32
    assert ApiKeys(key_file=key_file).authorized(f"Bearer {key}".encode())
    # Run again (the bootstrap is safe to rerun): the file, perhaps edited since, is kept.
    key_file.write_text("e" * 20 + "\n")
    subprocess.run(["/bin/sh", "-euc", step], check=True, env={"PATH": os.environ["PATH"]})
    assert key_file.read_text() == "e" * 20 + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["api-keys"]


def test_the_first_boot_writes_the_given_key_digests_and_no_key(tmp_path: Path) -> None:
    keys = ["f" * 32, "g" * 40]
    digests = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in keys)
    env = {"PATH": os.environ["PATH"], "API_KEY_SHA256S": digests}
    subprocess.run(["/bin/sh", "-euc", first_boot_key_step(tmp_path)], check=True, env=env)
    key_file = tmp_path / "api-keys"
    api_keys = ApiKeys(key_file=key_file)
    assert len(api_keys) == 2
    assert all(api_keys.authorized(f"Bearer {k}".encode()) for k in keys)
    assert not any(k in key_file.read_text() for k in keys)
