"""Rewrite the pinned versions in cloud-init.yaml: every node of a pool installs the same bits.

Resolves gguf-appliance's runtime dependencies for each supported Python (3.10 on Ubuntu 22.04,
3.11 on Debian 12, 3.12 on Ubuntu 24.04) with pip's resolver (`--dry-run --report`, wheels
only) and writes one constraint per package, with python_version markers where they differ.

    .venv/bin/python deploy/update_pins.py
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOUD_INIT = ROOT / "cloud-init.yaml"
# llama-cpp-python is an sdist (built on the node); its own requirements are resolved here.
LLAMA_CPP_REQUIREMENTS = [
    "numpy>=1.20.0",
    "typing-extensions>=4.5.0",
    "diskcache>=5.6.1",
    "jinja2>=2.11.3",
]


def resolve(python: str, requirements: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--only-binary=:all:",
                "--python-version",
                python,
                "--target",
                f"{tmp}/t",
                "--report",
                str(report),
                *requirements,
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return {
        i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installs
    }


def _node_requirement(requirement: str) -> bool:
    """A runtime requirement, or the OCI SDK of the `oci` extra (not llama-cpp-python: above)."""
    name, _, marker = requirement.partition(";")
    if name.startswith("llama-cpp-python"):
        return False
    if "extra" not in marker:
        return True
    return name.strip().startswith("oci>") and "'oci'" in marker.replace('"', "'")


def main() -> None:
    # The installed package's own metadata (`pip install -e .` keeps it in step with pyproject),
    # and the OCI SDK of its `oci` extra, which cloud-init installs beside it: a pool node posts
    # its load to OCI Monitoring and reads Vault secrets with it.
    requirements = [
        r.split(";", 1)[0].strip()
        for r in importlib.metadata.requires("gguf-appliance") or []
        if _node_requirement(r)
    ]
    version = importlib.metadata.version("gguf-appliance")
    pythons = ("3.10", "3.11", "3.12")
    resolved = {v: resolve(v, requirements + LLAMA_CPP_REQUIREMENTS) for v in pythons}
    lines = [f"gguf-appliance=={version}", "llama-cpp-python==0.3.36"]
    for name in sorted(set().union(*resolved.values())):
        versions = {v: resolved[v].get(name) for v in pythons}
        if len(set(versions.values())) == 1:
            lines.append(f"{name}=={versions['3.10']}")
            continue
        for python, version in versions.items():
            if version is not None:
                lines.append(f'{name}=={version}; python_version == "{python}"')
    block = "\n".join("      " + line for line in lines)
    text = CLOUD_INIT.read_text()
    text = re.sub(
        r"(      # pins:start\n).*?(\n      # pins:end)",
        lambda m: m[1] + block + m[2],
        text,
        flags=re.S,
    )
    CLOUD_INIT.write_text(text)


if __name__ == "__main__":
    main()
