from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader, LlamaFileType

from .errors import ModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    architecture: str
    name: str | None
    parameters: int
    quantization: str
    context_length: int | None
    has_chat_template: bool
    tensor_count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_size": self.file_size,
            "gguf_version": self.version,
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "has_chat_template": self.has_chat_template,
            "tensor_count": self.tensor_count,
        }


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: Path) -> GGUFInfo:
    """Read a GGUF file's metadata and check that it is complete.

    Raises ModelError with a one-line reason for a missing file, a file that is not GGUF and a
    truncated or corrupt one (a header that does not parse, tensor data past the end).
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (bad magic {magic!r}): {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError... on junk
        raise ModelError(f"corrupt or truncated GGUF file {path}: {exc}") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(
            f"truncated GGUF file {path}: tensor data ends at byte {end}, file has {size}"
        )
    arch = str(_field(reader, "general.architecture") or "unknown")
    file_type = _field(reader, "general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quant = "unknown"
    ctx = _field(reader, f"{arch}.context_length")
    return GGUFInfo(
        path=path,
        file_size=size,
        version=int(_field(reader, "GGUF.version")),
        architecture=arch,
        name=_field(reader, "general.name"),
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        quantization=quant,
        context_length=None if ctx is None else int(ctx),
        has_chat_template=_field(reader, "tokenizer.chat_template") is not None,
        tensor_count=len(reader.tensors),
    )
