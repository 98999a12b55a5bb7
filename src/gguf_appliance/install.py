"""`gguf-appliance install`: the systemd units and the NGINX site, for this installation.

The shipped files (`systemd/`, `nginx/`) are real files a person reads; only their @NAME@
placeholders are filled in: the paths of the running installation and a few choices. Running it
again changes nothing unless something differs, so cloud-init can run it on every boot.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .resources import shipped, static_dir

# The node and its helpers: each that reaches beyond loopback is a unit of its own, so the
# node's may reach loopback only (docs/security.md).
UNITS = (
    "gguf-appliance-secrets.service",
    "gguf-appliance-fetch.service",
    "gguf-appliance.service",
    "gguf-appliance-oci-metrics.service",
)
SITE = "gguf-appliance"

ENV_FILE_TEMPLATE = """\
# gguf-appliance settings (see `gguf-appliance settings --markdown` for every one).
# After a change: systemctl restart gguf-appliance-fetch gguf-appliance
#GGUF_APPLIANCE_MODEL=hf://TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf
# Or https://.../FILE.gguf (such as a pre-authenticated request); plain http:// needs the sha256.
#GGUF_APPLIANCE_MODEL_SHA256=
#GGUF_APPLIANCE_N_SLOTS=8
#GGUF_APPLIANCE_N_CTX=2048
# API keys are best kept in /etc/gguf-appliance/api-keys (`systemctl reload gguf-appliance`
# applies a change there without a restart); keys here need a restart.
#GGUF_APPLIANCE_API_KEYS=
# An API with no key must be asked for:
#GGUF_APPLIANCE_OPEN_API=true
#HF_TOKEN=
"""

KEY_FILE_TEMPLATE = """\
# gguf-appliance API keys: one a line, at least 16 characters, no spaces, or sha256: and a
# key's SHA-256 in hex instead of the key; lines starting with '#' are comments. With no key here
# (nor in GGUF_APPLIANCE_API_KEYS) the node does not start, unless appliance.env sets
# GGUF_APPLIANCE_OPEN_API=true. This file stays readable by root only; after a change:
# systemctl reload gguf-appliance
# A new key: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'
# The key made by `gguf-appliance install`:
"""


@dataclass(frozen=True)
class InstallPlan:
    bin_dir: Path
    static_dir: Path
    root: Path = Path("/")
    listen: str = "80"
    upstream: str = "127.0.0.1:8000"
    lb_subnet: str = "10.0.0.0/16"
    nginx_dir: Path = Path("/etc/nginx")

    @classmethod
    def for_this_installation(cls, **choices: object) -> InstallPlan:
        return cls(bin_dir=Path(sys.executable).parent, static_dir=static_dir(), **choices)  # type: ignore[arg-type]

    def values(self) -> dict[str, str]:
        return {
            "BIN": str(self.bin_dir),
            "STATIC_DIR": str(self.static_dir),
            "LISTEN": self.listen,
            "UPSTREAM": self.upstream,
            "LB_SUBNET": self.lb_subnet,
            "NGINX_DIR": str(self.nginx_dir),
        }

    def path(self, absolute: str | Path) -> Path:
        return self.root / str(absolute).lstrip("/")


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise ValueError(f"{template.name}: no value for {', '.join(left)}")
    return text


def rendered_files(plan: InstallPlan) -> dict[Path, str]:
    values = plan.values()
    files = {
        plan.path(f"/etc/systemd/system/{unit}"): render(shipped("systemd") / unit, values)
        for unit in UNITS
    }
    nginx = shipped("nginx")
    files[plan.path(plan.nginx_dir / "sites-available" / SITE)] = render(
        nginx / "gguf-appliance.conf", values
    )
    files[plan.path(plan.nginx_dir / "gguf-appliance-proxy.conf")] = render(
        nginx / "gguf-appliance-proxy.conf", values
    )
    return files


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    staged.replace(path)
    return True


def install(plan: InstallPlan, *, start: bool = True) -> list[str]:
    """Write what differs; enable and (re)start what changed. Returns what was done."""
    done = [f"wrote {p}" for p, text in rendered_files(plan).items() if _write_if_changed(p, text)]
    # The operator's files: created once (root's alone: they hold secrets), never overwritten.
    # A node needs a key: the key file starts with a new one (root reads it; clients get it).
    key_file = KEY_FILE_TEMPLATE + secrets.token_urlsafe(32) + "\n"
    for name, template in (("appliance.env", ENV_FILE_TEMPLATE), ("api-keys", key_file)):
        path = plan.path(f"/etc/gguf-appliance/{name}")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(template)
            done.append(f"wrote {path}")
    enabled = plan.path(plan.nginx_dir / "sites-enabled" / SITE)
    if not enabled.is_symlink():
        enabled.parent.mkdir(parents=True, exist_ok=True)
        enabled.symlink_to(plan.nginx_dir / "sites-available" / SITE)
        done.append(f"enabled {enabled}")
    default = plan.path(plan.nginx_dir / "sites-enabled" / "default")
    if default.is_symlink() or default.exists():  # it takes port 80's default_server
        default.unlink()
        done.append(f"disabled {default}")
    if start and plan.root == Path("/"):
        changed = bool(done)
        _run("systemctl", "daemon-reload")
        _run("systemctl", "enable", *UNITS, "nginx.service")
        _run("nginx", "-t", "-q")
        # --no-block: the first fetch of a large model takes long; the node starts after it.
        verb = "restart" if changed else "start"
        _run("systemctl", "--no-block", verb, *UNITS)
        _run("systemctl", "reload-or-restart", "nginx.service")
        done.append(f"systemctl {verb} {' '.join(UNITS)}; nginx reloaded")
    return done


def _run(*command: str) -> None:
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"{command[0]} is not installed")
    subprocess.run(command, check=True)
