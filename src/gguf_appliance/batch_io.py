"""Where batch jobs read rows and write results: local files or object storage, via fsspec.

Input is JSONL, CSV (either maybe compressed: fsspec infers gzip, bz2, xz, zstd from the name)
or a directory of text documents. A row that cannot be read becomes a `Row` with an error, so the
job reports it in its own output line and goes on.

Output is JSONL, one line per row, appended as rows finish. A local file is appended to and
flushed line by line, so a killed job loses only the rows in flight; a remote file (s3://,
oci://, gs://) is written through a local spool that is uploaded every `checkpoint_seconds` and
at the end. Rerunning a job reads the output (and the spool) back and skips the rows there. An
output holding anything a job does not write is refused and left as it is: the only bytes a job
ever removes are its own last line, cut short when it was killed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ApplianceError

FORMATS = ("jsonl", "csv", "docs")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_DOC_SUFFIXES = (".txt", ".md", ".text", ".rst")


class BatchInputError(ApplianceError):
    code = "batch_input"


@dataclass
class Row:
    # The row's id field (a string or a number), else {"line": n} (JSONL) or {"row": n} (CSV):
    # an object, which no id field can hold, so a row's own number never takes another's id.
    id: Any
    place: str  # where the row is, for messages: "line 3", "row 3", a document's path
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return row_key(self.id)


def row_key(row_id: Any) -> str:
    # 5 and "5" are different ids; JSON keeps them apart.
    return json.dumps(row_id, sort_keys=True)


def same_file(first: str, second: str, endpoint_url: str | None = None) -> bool:
    """Whether two paths or URLs name one file (through a link, or spelt another way)."""
    fs1, path1 = _open_fs(first, storage_options(first, endpoint_url))
    fs2, path2 = _open_fs(second, storage_options(second, endpoint_url))
    if isinstance(fs1, LocalFileSystem) and isinstance(fs2, LocalFileSystem):
        try:
            return os.path.samefile(path1, path2)
        except OSError:  # one of them does not exist yet
            return False
    return type(fs1) is type(fs2) and _normalised(fs1, path1) == _normalised(fs2, path2)


def _normalised(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # s3a:// is s3://; "a/../b" may be another key in a bucket, but calling it the same only
    # ever refuses a job, never loses a file.
    return str(fs.unstrip_protocol(posixpath.normpath(path)))


def storage_options(url: str, endpoint_url: str | None) -> dict[str, Any]:
    """fsspec options for `url`: the S3-compatible endpoint (OCI Object Storage's) if given."""
    if endpoint_url and url.startswith(("s3://", "s3a://")):
        return {"client_kwargs": {"endpoint_url": endpoint_url}}
    return {}


def _open_fs(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **options)  # type: ignore[no-any-return]
    except ImportError as exc:
        extra = {"s3": "s3", "oci": "oci", "gs": "gcs", "gcs": "gcs"}.get(url.split("://")[0])
        hint = f" (pip install 'gguf-appliance[{extra}]')" if extra else ""
        raise BatchInputError(f"cannot open {url}: {exc}{hint}") from None


def _base_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if fs.isdir(path):
        return "docs"
    name = _base_name(path)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    raise BatchInputError(
        f"cannot tell the format of {path}: name it .jsonl or .csv, or pass --format"
    )


def read_rows(
    url: str,
    *,
    fmt: str | None = None,
    id_field: str = "id",
    options: dict[str, Any] | None = None,
) -> Iterator[Row]:
    fs, path = _open_fs(url, options or {})
    if not fs.exists(path):
        raise BatchInputError(f"no such input: {url}")
    fmt = fmt or detect_format(fs, path)
    if fmt == "docs":
        yield from _read_docs(fs, path)
        return
    with fs.open(path, "rb", compression="infer") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        if fmt == "jsonl":
            yield from _read_jsonl(text, id_field)
        else:
            dialect = "excel-tab" if _base_name(path).endswith(".tsv") else "excel"
            yield from _read_csv(text, id_field, dialect)


def _with_id(own_id: dict[str, int], place: str, fields: dict[str, Any], row_id: Any) -> Row:
    if row_id is None:
        return Row(id=own_id, place=place, fields=fields)
    if isinstance(row_id, (dict, list)):
        return Row(id=own_id, place=place, error=f"{place}: its id is not a string or a number")
    return Row(id=row_id, place=place, fields=fields)


def _read_jsonl(text: IO[str], id_field: str) -> Iterator[Row]:
    number = 0
    while True:
        try:
            line = text.readline()
        except UnicodeDecodeError as exc:
            number += 1
            place = f"line {number}"
            yield Row({"line": number}, place, error=f"{place} is not UTF-8: {exc.reason}")
            return  # the decoder cannot resynchronise; stop here rather than guess
        if not line:
            return
        number += 1
        place = f"line {number}"
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row({"line": number}, place, error=f"{place} is not valid JSON: {exc.msg}")
            continue
        if not isinstance(data, dict):
            yield Row({"line": number}, place, error=f"{place} is not a JSON object")
            continue
        yield _with_id({"line": number}, place, data, data.get(id_field))


def _read_csv(text: IO[str], id_field: str, dialect: str) -> Iterator[Row]:
    reader = csv.reader(text, dialect=dialect)
    try:
        header = next(reader)
    except StopIteration:
        return
    except (csv.Error, UnicodeDecodeError) as exc:
        raise BatchInputError(f"cannot read the CSV header: {exc}") from None
    number = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            number += 1
            yield Row({"row": number}, f"row {number}", error=f"row {number} cannot be read: {exc}")
            if isinstance(exc, UnicodeDecodeError):
                return
            continue
        number += 1
        place = f"row {number}"
        if not values:
            continue
        if len(values) != len(header):
            yield Row(
                {"row": number},
                place,
                error=f"{place} has {len(values)} fields; the header has {len(header)}",
            )
            continue
        fields = dict(zip(header, values, strict=True))
        # CSV has no null: an empty cell is a row without an id.
        yield _with_id({"row": number}, place, fields, fields.get(id_field) or None)


def _read_docs(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Row]:
    root = path.rstrip("/")
    names = sorted(
        name
        for name in fs.find(root)
        if _base_name(name).endswith(_DOC_SUFFIXES) and not name.rsplit("/", 1)[-1].startswith(".")
    )
    for name in names:
        relative = name[len(root) :].lstrip("/")
        try:
            with fs.open(name, "rb", compression="infer") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Row(relative, relative, error=f"{relative} is not UTF-8: {exc.reason}")
            continue
        yield Row(relative, relative, fields={"text": text, "path": relative})


class ResultWriter:
    """The job's output: what is already there (to resume) and an append-only line writer."""

    def __init__(
        self,
        url: str,
        *,
        options: dict[str, Any] | None = None,
        spool_dir: Path | None = None,
        checkpoint_seconds: float = 30.0,
    ) -> None:
        self.url = url
        self.fs, self.path = _open_fs(url, options or {})
        self.remote = not isinstance(self.fs, LocalFileSystem)
        self.checkpoint_seconds = checkpoint_seconds
        self.done: set[str] = set()
        if self.fs.isdir(self.path):
            raise BatchInputError(f"the output {url} is a directory; name a file")
        if self.remote:
            spool_dir = spool_dir or default_spool_dir()
            spool_dir.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(url.encode()).hexdigest()[:16]
            self.local = spool_dir / f"{digest}.jsonl"
            self._recover_remote()
        else:
            self.local = Path(self.path)
            self.local.parent.mkdir(parents=True, exist_ok=True)
            self._recover_local()
        self._file = self.local.open("a", encoding="utf-8")
        if self.local.stat().st_size and not self._ends_with_newline():
            self._file.write("\n")  # its last line is whole but has no newline: end it
        self._last_upload = time.monotonic()
        self._dirty = False

    def _recover_local(self) -> None:
        if not self.local.exists():
            return
        data = self.local.read_bytes()
        results, keep = read_results(data, self.url)
        self.done.update(results)
        if keep < len(data):
            os.truncate(self.local, keep)

    def _recover_remote(self) -> None:
        """The bucket's copy and this machine's spool, merged into the spool."""
        results: dict[str, bytes] = {}
        if self.fs.exists(self.path):
            results, _ = read_results(self.fs.cat_file(self.path), self.url)
        if self.local.exists():
            spooled, _ = read_results(
                self.local.read_bytes(), f"{self.local} (the local copy of {self.url})"
            )
            for key, line in spooled.items():
                results.setdefault(key, line)
        self.done.update(results)
        tmp = self.local.with_name(self.local.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in results.values()))
        os.replace(tmp, self.local)

    def _ends_with_newline(self) -> bool:
        with self.local.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def write(self, record: dict[str, Any]) -> None:
        key = row_key(record["id"])
        if key in self.done:
            raise RuntimeError(f"row {record['id']!r} written twice")  # a bug, not bad input
        self.done.add(key)
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()  # in the kernel's hands: a killed job keeps the line
        self._dirty = True
        if self.remote and time.monotonic() - self._last_upload >= self.checkpoint_seconds:
            self.upload()

    def upload(self) -> None:
        if not self.remote:
            return
        os.fsync(self._file.fileno())
        self.fs.put_file(str(self.local), self.path)
        self._last_upload = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        if self._dirty or (self.remote and not self.fs.exists(self.path)):
            self.upload()
        os.fsync(self._file.fileno())
        self._file.close()


# What a result line holds; `write` puts "id" first, so a line cut short begins like this.
_RESULT_FIELDS = frozenset({"id", "result", "error", "tokens", "seconds", "calls"})
_RESULT_START = b'{"id": '


def read_results(data: bytes, name: str) -> tuple[dict[str, bytes], int]:
    """The result lines of an output a job wrote, by row key, and how many of its bytes to keep.

    Only a last line without its newline that begins like a result line and is not whole JSON (a
    job killed while writing it) is left out. Any other line a job does not write raises
    BatchInputError: the output is someone else's file, and is not touched.
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: nothing, unless a line is unfinished
    keep = len(data)
    if tail.strip():
        try:
            json.loads(tail)
        except ValueError:
            if tail.startswith(_RESULT_START) or _RESULT_START.startswith(tail):
                keep -= len(tail)
                tail = b""
        lines.append(tail)  # whole (or not ours): checked with the others
    results: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            key = _result_key(line)
        except ValueError as exc:
            raise BatchInputError(
                f"{name} holds lines a batch job did not write: line {number} {exc}. "
                "It is left as it is; name another output file."
            ) from None
        results.setdefault(key, line)
    return results, keep


def _result_key(line: bytes) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(record, dict):
        raise ValueError("is not a JSON object")
    other = sorted(set(record) - _RESULT_FIELDS)
    if other:
        raise ValueError(f"has a field {other[0]!r}, which result lines do not have")
    if "id" not in record or "result" not in record:
        raise ValueError("has no id or no result")
    row_id = record["id"]
    own = isinstance(row_id, dict) and len(row_id) == 1 and row_id.keys() <= {"line", "row"}
    if row_id is None or isinstance(row_id, list) or (isinstance(row_id, dict) and not own):
        raise ValueError(f"has the id {json.dumps(row_id)}, which no row has")
    return row_key(row_id)


def default_spool_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gguf-appliance" / "batch"
