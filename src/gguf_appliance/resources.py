"""Files shipped beside the code: the page, and later the unit and site templates.

In a wheel they sit inside the package (pyproject.toml force-includes them); in a source
checkout (an editable install) they are read from the repository's top-level folders.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parents[1] / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{name} is missing from this installation of gguf-appliance")


def static_dir() -> Path:
    return shipped("static")
