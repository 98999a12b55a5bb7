"""Getting model files over the network: plain HTTPS (with resume) and the Hugging Face Hub.

Both write next to the destination (`NAME.part`, or huggingface_hub's own cache) and leave it to
the caller to verify and move the file into place. Every failure a user can cause becomes a
`ModelError` with one line saying what to do; one that may pass (the network, a server's 5xx) is
a `FetchUnavailable`, so the fetch unit retries it and nothing else. A URL is only ever shown
redacted (`redact_source`), in our messages and in httpx's own log lines.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from tqdm.std import tqdm as Tqdm

from .errors import ModelError
from .oci_secrets import DEFAULT_HF_TOKEN_FILE as HF_TOKEN_FILE
from .progress import new_bar
from .settings import DEFAULT_ENV_FILE

log = logging.getLogger("gguf_appliance.fetch")

_ATTEMPTS = 5  # tries per file while each one still brings new bytes
_CHUNK = 1 << 20


# A file name that may be shown: ends in .gguf and is short (not an opaque token).
GGUF_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,120}\.gguf")


def redact_source(uri: str) -> str:
    """The source as it may be shown in a message, a log line or /health/ready.

    A URL keeps its scheme, host and port and its file name; credentials, the query and the
    path segments in between (where a pre-authenticated request keeps its token) become `...`.
    Bundled names, hf:// sources and local paths hold no secret and are shown as they are.
    """
    if "://" not in uri or uri.startswith(("hf://", "file://")):
        return uri
    url = urlparse(uri)
    host = url.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = url.port
    except ValueError:
        port = None
    shown = f"{url.scheme}://{host}" + (f":{port}" if port else "")
    segments = [s for s in url.path.split("/") if s]
    if len(segments) > 1:
        shown += "/..."
    if segments:
        name = segments[-1]
        shown += "/" + (name if GGUF_NAME.fullmatch(name) else "...")
    return shown + ("?..." if url.query else "")


class FetchUnavailable(ModelError):
    """The network or the server failed; the same fetch may work later.

    `fetch --retry-for` tries it again in the same process (a resumed download keeps what it
    has) unless `retry_in_process` is false: what only a new start of the fetch unit can mend.
    """

    retry_in_process = True


class TokenNotDelivered(FetchUnavailable):
    """The Hub refused us, OCI_HF_TOKEN_SECRET is set and no token came: the secrets step failed.
    The token reaches the fetch as a credential at the unit's start, so retrying in the same
    process cannot bring it; a new start of the unit (its ExecStartPre reads the Vault again) can.
    """

    retry_in_process = False


class _RedactUrls(logging.Filter):
    """httpx logs each request's URL at INFO: show it as redact_source does."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_source(str(arg)) if isinstance(arg, httpx.URL) else arg
                for arg in record.args
            )
        return True


_REDACT_URLS = _RedactUrls()


def disk_error(exc: OSError, where: Path) -> ModelError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ModelError(f"no space left to write {where} ({os.strerror(exc.errno or 0)})")
    return ModelError(f"cannot write {where}: {exc.strerror or exc}")


def _total_from(response: httpx.Response, offset: int) -> int | None:
    content_range = response.headers.get("content-range", "")
    match = re.match(r"bytes \d+-\d+/(\d+)", content_range)
    if match:
        return int(match.group(1))
    length = response.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def _host(url: str) -> str:
    """HOST[:PORT] of a URL, without the user:pass@ it may carry."""
    return urlparse(url).netloc.rpartition("@")[2]


def _http_failure(url: str, status: int) -> ModelError:
    shown = redact_source(url)
    host = _host(url)
    if status in (401, 403):
        return ModelError(
            f"access denied (HTTP {status}) by {host}: the URL needs credentials, or a "
            f"pre-authenticated request has expired"
        )
    if status == 404:
        return ModelError(f"not found (HTTP 404): {shown}")
    if status in (408, 429) or status >= 500:
        return FetchUnavailable(f"HTTP {status} from {host} for {shown}; try again later")
    return ModelError(f"HTTP {status} from {host} for {shown}")


def download_url(url: str, part: Path, progress: type[Tqdm[Any]], *, https_only: bool) -> None:
    """Download `url` into `part`, resuming from what `part` already holds.

    Redirects are followed (object storage pre-authenticated requests, CDNs), to https:// only
    when `https_only` (no sha256 protects the file). A transfer that breaks off is resumed with
    a Range request as long as each attempt brings new bytes.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    name = part.name.removesuffix(".part")
    timeout = httpx.Timeout(30.0, read=120.0)
    attempts_left = _ATTEMPTS
    bar = None
    logging.getLogger("httpx").addFilter(_REDACT_URLS)  # added once: filters are a set

    def refuse_plain_http(request: httpx.Request) -> None:
        if https_only and request.url.scheme != "https":
            raise ModelError(
                f"refusing plain http:// without a sha256 ({redact_source(str(request.url))}, "
                f"reached from {redact_source(url)}): give the file's sha256"
            )

    hooks = {"request": [refuse_plain_http]}
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout, event_hooks=hooks) as client:
            while True:
                have = part.stat().st_size if part.exists() else 0
                headers = {"Range": f"bytes={have}-"} if have else {}
                try:
                    with client.stream("GET", url, headers=headers) as response:
                        if response.status_code == 416 and have:
                            return  # the part already holds the whole file
                        if response.status_code not in (200, 206):
                            raise _http_failure(url, response.status_code)
                        if response.status_code == 200 and have:
                            have = 0  # the server ignored Range: start over
                        total = _total_from(response, have)
                        if bar is None:
                            bar = new_bar(progress, total, name, initial=have)
                        else:
                            bar.reset(total)
                            bar.update(have)
                        with part.open("r+b" if have else "wb") as out:
                            out.seek(have)
                            out.truncate()
                            for chunk in response.iter_bytes(_CHUNK):
                                out.write(chunk)
                                bar.update(len(chunk))
                    done = part.stat().st_size
                    if total is None or done >= total:
                        return
                    raise httpx.RemoteProtocolError(
                        f"the transfer ended at {done} of {total} bytes"
                    )
                except httpx.TransportError as exc:
                    grew = part.exists() and part.stat().st_size > have
                    attempts_left = _ATTEMPTS if grew else attempts_left - 1
                    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                        if attempts_left <= 0:
                            raise FetchUnavailable(f"cannot reach {_host(url)}: {exc}") from None
                    elif attempts_left <= 0:
                        raise FetchUnavailable(
                            f"the download of {redact_source(url)} keeps failing: {exc}"
                        ) from None
                    log.warning("%s: transfer interrupted (%s); resuming", name, exc)
                    time.sleep(min(2.0, 0.2 * (_ATTEMPTS - attempts_left + 1)))
    except (httpx.InvalidURL, httpx.TooManyRedirects) as exc:
        raise ModelError(f"cannot download {redact_source(url)}: {exc}") from None
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise disk_error(exc, part) from None
    finally:
        if bar is not None:
            bar.close()


_NO_TOKEN = (
    "give a token: HF_TOKEN, or a file named by HF_TOKEN_PATH; on a node, the OCI Vault secret "
    f"GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET names (written to {HF_TOKEN_FILE}, which the fetch unit "
    f"reads), the file itself, or HF_TOKEN in {DEFAULT_ENV_FILE}"
)


def hub_token_source(vault_secret: str | None = None) -> str | None:
    """Where huggingface_hub takes its token from, as a message names it (never the token);
    None when it has none. Its order: HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), then the file at
    HF_TOKEN_PATH; a file holding only blank lines is no token (the fetch unit's stand-in when
    there is no token file). A token file that cannot be read is a ModelError, not the
    "cannot write the cache" that huggingface_hub's PermissionError would otherwise become."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            if os.environ[name].strip():
                return name
            break  # huggingface_hub takes the first one set, even if blank
    path = Path(constants.HF_TOKEN_PATH)
    try:
        if not path.read_text().strip():
            return None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ModelError(
            f"cannot read the Hugging Face token file {path} (HF_TOKEN_PATH): {reason}"
        ) from None
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and path.parent == Path(credentials):
        vault = f", from the OCI Vault secret {vault_secret}" if vault_secret else ""
        return f"{HF_TOKEN_FILE} (the fetch unit's credential {path}{vault})"
    return f"{path} (HF_TOKEN_PATH)"


def _token_refused(repo_id: str, what: str, source: str | None, vault_secret: str | None) -> str:
    """The end of a message for a repository the Hub keeps from us, naming the token's source."""
    if source is not None:
        return (
            f"{what}, and the Hugging Face token from {source} has no access to it: accept "
            f"{repo_id}'s licence on the Hub with the token's account, or give another token"
        )
    if vault_secret:
        return (
            f"{what}, and no Hugging Face token reached the fetch, though "
            f"GGUF_APPLIANCE_OCI_HF_TOKEN_SECRET names {vault_secret}: gguf-appliance-secrets "
            f"writes it to {HF_TOKEN_FILE} (see journalctl -u gguf-appliance-secrets)"
        )
    return f"{what}, and no Hugging Face token was given: {_NO_TOKEN}"


def download_from_hub(
    repo_id: str,
    filename: str,
    revision: str | None,
    cache_dir: Path,
    progress: type[Tqdm[Any]],
    *,
    vault_secret: str | None = None,
) -> tuple[Path, str | None]:
    """A file of a Hugging Face repository through huggingface_hub (HF_ENDPOINT, HF_TOKEN or
    HF_TOKEN_PATH).

    Returns the file in huggingface_hub's cache and the sha256 the Hub states for it (the ETag
    of LFS files), or None when the Hub gives none. `vault_secret` (the setting
    OCI_HF_TOKEN_SECRET) only shapes the messages: a repository refused while that secret is
    named and no token reached us is a FetchUnavailable (the Vault may answer the next time).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hf

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    shown_endpoint = redact_source(endpoint)
    where = f"{filename} in {repo_id}" + (f" at {revision}" if revision else "")
    token = hub_token_source(vault_secret)
    # No token though the Vault should have given one: the secrets unit failed (the Vault was
    # down, say); the fetch unit's retry starts it again.
    refused = TokenNotDelivered if token is None and vault_secret else ModelError
    try:
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
        metadata = get_hf_file_metadata(url)
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            tqdm_class=progress,
        )
    except hf.GatedRepoError:
        raise refused(_token_refused(repo_id, f"{repo_id} is gated", token, vault_secret)) from None
    except hf.RepositoryNotFoundError:
        what = f"repository {repo_id} not found, or it is private"
        raise refused(_token_refused(repo_id, what, token, vault_secret)) from None
    except hf.RevisionNotFoundError:
        raise ModelError(f"revision {revision} not found in {repo_id}") from None
    except hf.EntryNotFoundError:
        raise ModelError(f"file not found: {where}") from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 401 and token is not None:
            raise ModelError(
                f"the Hub refused the Hugging Face token from {token} (HTTP 401): it is not a "
                f"valid token, or it was revoked"
            ) from None
        if status in (401, 403):
            what = f"the Hub answered HTTP {status} for {where}"
            raise refused(_token_refused(repo_id, what, token, vault_secret)) from None
        error = FetchUnavailable if status in (0, 408, 429) or status >= 500 else ModelError
        raise error(f"the Hub answered HTTP {status or '?'} for {where}") from None
    except OSError as exc:
        if exc.errno is not None:
            raise disk_error(exc, cache_dir) from None
        raise FetchUnavailable(f"cannot reach the Hub at {shown_endpoint}: {exc}") from None
    except Exception as exc:  # httpx transport errors reach us under several names
        raise FetchUnavailable(f"cannot reach the Hub at {shown_endpoint}: {exc}") from None
    etag = (metadata.etag or "").strip('"').lower()
    return Path(path), etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
