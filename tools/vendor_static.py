"""Refresh the chat page's vendored libraries (static/vendor/) from the npm registry.

static/vendor/manifest.json names each package, its version and licence, the registry's
integrity hash of its tarball, and each file taken from it with the file's sha256. This script
reads it, fetches each package's tarball with `npm pack` (npm checks the tarball against the
registry's integrity hash), copies the listed files out and writes the manifest back with the
new checksums. The files are served as they are: there is no build step.

    python tools/vendor_static.py            # the manifest's versions, fetched again
    python tools/vendor_static.py --latest   # each package's newest version
    python tools/vendor_static.py --check    # the files on disk match the manifest (no network)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

VENDOR_DIR = Path(__file__).resolve().parents[1] / "static" / "vendor"
MANIFEST = VENDOR_DIR / "manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm(*args: str, cwd: Path | None = None) -> Any:
    out = subprocess.run(
        ["npm", *args, "--json"], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def refresh(package: dict[str, Any], latest: bool) -> None:
    name = package["package"]
    version = npm("view", name, "version") if latest else package["version"]
    with tempfile.TemporaryDirectory() as tmp:
        packed = npm("pack", f"{name}@{version}", "--pack-destination", tmp, cwd=Path(tmp))[0]
        license_name = npm("view", f"{name}@{version}", "license")
        with tarfile.open(Path(tmp) / packed["filename"]) as tarball:
            for file in package["files"]:
                member = tarball.extractfile("package/" + file["from"])
                if member is None:
                    raise SystemExit(f"{name}@{version} has no file {file['from']}")
                data = member.read()
                (VENDOR_DIR / file["to"]).write_bytes(data)
                file["sha256"] = sha256(data)
    package.update(version=version, license=license_name, integrity=packed["integrity"])
    print(f"{name}@{version} ({license_name}): {len(package['files'])} files")


def check(manifest: dict[str, Any]) -> list[str]:
    """What differs between the vendored files and the manifest (empty: nothing)."""
    problems = []
    listed = {"manifest.json"}
    for package in manifest["packages"]:
        for file in package["files"]:
            listed.add(file["to"])
            path = VENDOR_DIR / file["to"]
            if not path.is_file():
                problems.append(f"{file['to']} is missing")
            elif sha256(path.read_bytes()) != file["sha256"]:
                problems.append(f"{file['to']} does not match its sha256 in the manifest")
    for path in VENDOR_DIR.iterdir():
        if path.name not in listed:
            problems.append(f"{path.name} is not in the manifest")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latest", action="store_true", help="take each package's newest version")
    parser.add_argument("--check", action="store_true", help="only compare files and manifest")
    args = parser.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    if not args.check:
        for package in manifest["packages"]:
            refresh(package, args.latest)
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    problems = check(manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
