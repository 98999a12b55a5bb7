from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, LlamaFileType

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


_INTEGER_TYPES = {
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
}


def _text(reader: GGUFReader, key: str, path: Path) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types != [GGUFValueType.STRING]:
        raise _wrong_type(key, "a string", field.types, path)
    return str(field.contents())


def _count(reader: GGUFReader, key: str, path: Path) -> int | None:
    """A non-negative integer (a context length, a file type); llama.cpp refuses other types."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if len(field.types) != 1 or field.types[0] not in _INTEGER_TYPES:
        raise _wrong_type(key, "an integer", field.types, path)
    value = int(field.contents())
    if value < 0:
        raise ModelError(f"bad GGUF metadata in {path}: {key} is {value}, below zero")
    return value


def _wrong_type(key: str, expected: str, types: list[GGUFValueType], path: Path) -> ModelError:
    found = " of ".join(t.name.lower() for t in types) or "nothing"
    return ModelError(f"bad GGUF metadata in {path}: {key} should be {expected}, not {found}")


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
    # Every key read here has the type llama.cpp insists on: a wrong one is a clear refusal
    # now rather than a failed load later.
    arch = _text(reader, "general.architecture", path) or "unknown"
    file_type = _count(reader, "general.file_type", path)
    quant = "unknown"
    if file_type is not None:
        with contextlib.suppress(ValueError):  # a type newer than this gguf package
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    return GGUFInfo(
        path=path,
        file_size=size,
        version=int(reader.fields["GGUF.version"].contents()),
        architecture=arch,
        name=_text(reader, "general.name", path),
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        quantization=quant,
        context_length=_count(reader, f"{arch}.context_length", path),
        has_chat_template=_text(reader, "tokenizer.chat_template", path) is not None,
        tensor_count=len(reader.tensors),
    )
