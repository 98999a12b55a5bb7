"""The pins cloud-init.yaml installs resolve for aarch64 (issue #20, item 1), asking only the
package registry (PyPI, through pip).

For each supported Python, pip resolves gguf-appliance's runtime requirements, and those of
llama-cpp-python, under cloud-init's constraints, wheels only, for the manylinux aarch64
platforms of the release that ships that Python: every package must come as an aarch64 or
pure-Python wheel at its pinned version, and nothing unpinned may come in. llama-cpp-python has
no aarch64 wheel: the node compiles its sdist, whose build needs (read from the sdist, stated
here) are checked against the packages cloud-init installs.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# llama-cpp-python's build needs, read from its 0.3.36 sdist (76 MB: not downloaded by the
# test): pyproject.toml's build-system requires and [tool.scikit-build] cmake.minimum-version,
# CMakeLists.txt's cmake_minimum_required (3.21; vendor/llama.cpp's is 3.14) and project()
# with its default languages, C and C++. A new pin fails the test until they are read again.
LLAMA_CPP_BUILD: dict[str, Any] = {
    "version": "0.3.36",
    "build_requires": ["scikit-build-core[pyproject]>=0.9.2"],
    "cmake": "3.21",
}

# The release each supported Python is the system Python of (what cloud-init's
# `python3 -m venv` gets), its glibc (the newest manylinux tag it runs) and its cmake (the
# `cmake` package cloud-init installs), from the distributions' archives.
RELEASES = {
    "3.10": ("Ubuntu 22.04", 35, "3.22.1"),
    "3.11": ("Debian 12", 36, "3.25.1"),
    "3.12": ("Ubuntu 24.04", 39, "3.28.3"),
}


def cloud_init() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "cloud-init.yaml").read_text())
    return data


def pins(python: str) -> dict[str, str]:
    """cloud-init's constraints that apply to this Python: name -> version."""
    files = {f["path"]: f["content"] for f in cloud_init()["write_files"]}
    found = {}
    for line in files["/etc/gguf-appliance/constraints.txt"].splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"python_version": python}):
            (spec,) = req.specifier
            assert spec.operator == "==", f"not an exact pin: {line}"
            found[canonicalize_name(req.name)] = spec.version
    return found


def aarch64_platforms(glibc_minor: int) -> list[str]:
    platforms = ["--platform", "manylinux2014_aarch64"]
    for minor in range(17, glibc_minor + 1):
        platforms += ["--platform", f"manylinux_2_{minor}_aarch64"]
    return platforms


def pip_resolve(python: str, requirements: list[str], constraints: Path, tmp: Path) -> Any:
    report = tmp / f"report-{python}.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    done = subprocess.run(
        [
            *pip,
            *("--only-binary=:all:", "--python-version", python, "--implementation", "cp"),
            *aarch64_platforms(RELEASES[python][1]),
            *("--target", str(tmp / "target"), "--report", str(report)),
            *("--constraint", str(constraints), *requirements),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"pip cannot resolve for aarch64, Python {python}:\n{done.stderr}"
    return json.loads(report.read_text())["install"]


def runtime_requirements() -> list[str]:
    ours = [
        r
        for r in importlib.metadata.requires("gguf-appliance") or []
        if "extra ==" not in r and not r.startswith("llama-cpp-python")
    ]
    # llama-cpp-python's own requirements (no platform markers: the same on aarch64).
    return ours + list(importlib.metadata.requires("llama_cpp_python") or [])


@pytest.mark.parametrize("python", sorted(RELEASES))
def test_every_pin_has_an_aarch64_wheel(python: str, tmp_path: Path) -> None:
    pinned = pins(python)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pinned.items()))
    installs = pip_resolve(python, runtime_requirements(), constraints, tmp_path)
    resolved = {}
    for item in installs:
        name = canonicalize_name(item["metadata"]["name"])
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        assert filename.endswith(".whl"), f"{name}: not a wheel: {filename}"
        _, _, _, tags = parse_wheel_filename(filename)
        assert all(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags), filename
        assert name in pinned, f"{name} {item['metadata']['version']} is not pinned"
        assert Version(item["metadata"]["version"]) == Version(pinned[name]), name
        resolved[name] = filename
    assert {"numpy", "pydantic-core", "uvloop", "httptools"} <= set(resolved)  # compiled ones


def test_llama_cpp_python_builds_from_its_sdist_with_what_cloud_init_installs(
    tmp_path: Path,
) -> None:
    version = pins("3.12")["llama-cpp-python"]
    assert version == LLAMA_CPP_BUILD["version"], "a new pin: read its sdist's build needs again"
    # No aarch64 wheel on PyPI (asked for the newest glibc of the three): the node compiles the
    # sdist.
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    wheel = subprocess.run(
        [
            *(*download, "--python-version", "3.12", "--implementation", "cp"),
            *aarch64_platforms(39),
            *("--dest", str(tmp_path / "wheel"), f"llama-cpp-python=={version}"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wheel.returncode != 0, "an aarch64 wheel appeared: check its tags instead"
    assert "No matching distribution" in wheel.stderr, wheel.stderr
    files = {f["path"]: f["content"] for f in cloud_init()["write_files"]}
    line = re.search(r'^PACKAGES="([^"]*)"$', files["/etc/gguf-appliance/bootstrap.env"], re.M)
    assert line, "no PACKAGES line in bootstrap.env"
    packages = set(line[1].split())
    assert {"build-essential", "cmake", "python3-venv"} <= packages
    for release, _, cmake in RELEASES.values():
        assert Version(cmake) >= Version(LLAMA_CPP_BUILD["cmake"]), release
    # What pip fetches into the build environment: the backend, and what scikit-build-core
    # adds there (ninja; cmake only where the system's is older than 3.21).
    empty = tmp_path / "none.txt"
    empty.write_text("")
    needs = [*LLAMA_CPP_BUILD["build_requires"], "ninja", f"cmake>={LLAMA_CPP_BUILD['cmake']}"]
    for python in RELEASES:
        for item in pip_resolve(python, needs, empty, tmp_path):
            filename = item["download_info"]["url"].rsplit("/", 1)[-1]
            _, _, _, tags = parse_wheel_filename(filename)
            assert all(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags)
