"""The `gguf-appliance` command: serve, fetch, info, settings, bench."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from .errors import ModelError
from .keys import KeyFileError
from .logs import configure_logging
from .settings import DEFAULT_ENV_FILE, ENV_PREFIX, Settings, load_settings

# sysexits' EX_TEMPFAIL: a fetch that may work later (the network, a server's 5xx). Every other
# failure exits 1 or 2, which the fetch unit does not retry: a wrong checksum stays wrong.
EXIT_TEMPORARY = 75

T = TypeVar("T")
log = logging.getLogger("gguf_appliance.cli")


def retrying(
    what: str,
    attempt: Callable[[], T],
    may_pass: Callable[[BaseException], bool],
    *,
    retry_for: float,
    first_delay: float,
    max_delay: float,
) -> T:
    """`attempt()`, tried again while it raises what `may_pass` and `retry_for` seconds have not
    passed since the first try: waits double from `first_delay` up to `max_delay`, each a random
    50-100% of that (nodes booting together do not come back in step), never past the deadline.
    The last failure is raised as it is. Each retry is logged with the failure's own message
    (ours are one line with any URL redacted; never a token)."""
    deadline = time.monotonic() + retry_for
    failures = 0
    while True:
        try:
            return attempt()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not may_pass(exc) or left <= 0:
                raise
            failures += 1
            delay = min(max_delay, first_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            delay = min(delay, left)
            reason = getattr(exc, "message", None) or str(exc)
            log.warning(
                "%s failed (%s); try %d in %.1f s, giving up %.0f s from now",
                what,
                reason,
                failures + 1,
                delay,
                left,
                extra={"fields": {"failures": failures, "retry_in": round(delay, 3)}},
            )
            time.sleep(delay)


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(args.env_file, **{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    settings = _settings(args, host=args.host, port=args.port, model=args.model)
    configure_logging(settings.log_level, settings.log_format)
    serve(settings)
    return 0


def cmd_vault_secrets(args: argparse.Namespace) -> int:
    from .oci_auth import OciUnavailable
    from .oci_secrets import VaultSecretError, write_vault_secrets

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        write_vault_secrets(settings, args.key_file, args.hf_token_file)
    except (VaultSecretError, OciUnavailable) as exc:
        print(
            f"gguf-appliance: secrets not written, the files stay as they were: {exc}",
            file=sys.stderr,
        )
        return EXIT_TEMPORARY
    return 0


def cmd_oci_metrics(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .oci_metrics import load_publisher

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.oci_metrics_compartment:
        print("gguf-appliance: no OCI_METRICS_COMPARTMENT set: the load is not posted")
        return 0
    publisher = load_publisher(settings)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    publisher.run_until(stop)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .downloads import FetchUnavailable, redact_source
    from .sources import fetch_model

    settings = _settings(args, model=args.source, model_sha256=args.sha256)
    configure_logging(settings.log_level, settings.log_format)

    def fetch(source: str, sha256: str | None) -> Path:
        # A failure that may pass is tried again in this process, so the unit's start (and the
        # node's, which waits for it) fails only once the fetch gives up. A download cut off
        # resumes from its .part file (or huggingface_hub's .incomplete one) as a new start would.
        info = retrying(
            f"fetching {redact_source(source)}",
            lambda: fetch_model(
                source,
                settings.models_dir,
                sha256=sha256,
                progress_interval=settings.progress_interval,
                hf_token_secret=settings.oci_hf_token_secret,
            ),
            lambda exc: isinstance(exc, FetchUnavailable) and exc.retry_in_process,
            retry_for=args.retry_for,
            first_delay=args.retry_delay,
            max_delay=args.retry_max_delay,
        )
        return info.path

    print(fetch(settings.model, settings.model_sha256))
    if args.source is None and settings.embedding_model:
        # The fetch unit runs `fetch` alone: the embedding model too, so the node (whose
        # models directory is read-only) finds both fetched and verified.
        print(fetch(settings.embedding_model, settings.embedding_model_sha256))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .sources import fetch_model

    settings = _settings(args, model=args.source)
    configure_logging(settings.log_level, settings.log_format)
    info = fetch_model(
        settings.model, settings.models_dir, progress_interval=settings.progress_interval
    ).as_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from .install import InstallPlan, install

    plan = InstallPlan.for_this_installation(
        root=args.root,
        listen=args.listen,
        upstream=f"127.0.0.1:{args.port}",
        lb_subnet=args.lb_subnet,
    )
    for line in install(plan, start=not args.no_start) or ["nothing to change"]:
        print(line)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from .batch import BatchOptions, run_batch
    from .batch_backends import JobFailed
    from .batch_io import BatchInputError
    from .errors import InvalidRequest

    settings = _settings(args, model=args.model_source)
    configure_logging(settings.log_level, settings.log_format)
    schema = None
    if args.schema is not None:
        schema = json.loads(Path(args.schema).read_text(encoding="utf-8"))
    template = args.template
    if template is not None and template.startswith("@"):
        template = Path(template[1:]).read_text(encoding="utf-8")
    opts = BatchOptions(
        input=args.input,
        output=args.output,
        task=args.task,
        labels=tuple(label.strip() for label in (args.labels or "").split(",") if label.strip()),
        template=template,
        schema=schema,
        system=args.system,
        id_field=args.id_field,
        text_field=args.text_field,
        format=args.format,
        target=args.target,
        api_key=args.api_key or os.environ.get("GGUF_APPLIANCE_BATCH_API_KEY"),
        model=args.model,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        chunk_chars=args.chunk_chars,
        retries=args.retries,
        endpoint_url=args.endpoint_url,
        checkpoint_seconds=args.checkpoint_seconds,
        progress_interval=settings.progress_interval,
    )
    try:
        summary = asyncio.run(run_batch(opts, settings))
    except (InvalidRequest, BatchInputError, JobFailed) as exc:
        print(f"gguf-appliance batch: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gguf-appliance batch: interrupted; run the same command to go on", file=sys.stderr)
        return 130
    print(f"gguf-appliance batch: {summary.line()}", file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return 0 if summary.failed == 0 else 3


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not counts or counts[0] < 1 or counts[-1] > 256:
        raise argparse.ArgumentTypeError(f"each count must be 1 to 256: {text}")
    return counts


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 4096:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 4096: {text}")
    return int(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, default_sequences, default_threads, format_report, measure
    from .settings import physical_cores
    from .sources import fetch_model

    settings = _settings(args, model=args.model)
    configure_logging(settings.log_level, settings.log_format)
    path = fetch_model(
        settings.model,
        settings.models_dir,
        sha256=settings.model_sha256,
        progress_interval=settings.progress_interval,
    ).path
    options = BenchOptions(
        threads=args.threads or default_threads(physical_cores()),
        sequences=args.sequences or default_sequences(settings.n_slots),
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        rounds=args.rounds,
    )
    result = measure(path, options)
    print(format_report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0


def settings_markdown() -> str:
    """A table of every setting: its variable, default and description (for the README)."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(computed)" if name == "threads" else "(empty)"
        else:
            default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


def shown_settings(settings: Settings) -> dict[str, Any]:
    """The settings as `settings` prints them: API keys by their last 4 characters only, the
    model source redacted (a URL may hold a token)."""
    from .downloads import redact_source

    shown = settings.model_dump(mode="json")
    shown["api_keys"] = [f"***{key[-4:]}" for key in settings.api_keys]
    shown["model"] = redact_source(settings.model)
    if settings.embedding_model:
        shown["embedding_model"] = redact_source(settings.embedding_model)
    return shown


def cmd_settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_markdown())
    else:
        print(json.dumps(shown_settings(_settings(args)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gguf-appliance", description="A streaming LLM node over llama.cpp."
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help=f"settings file (default: ${ENV_PREFIX}ENV_FILE or {DEFAULT_ENV_FILE})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API and the chat page")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--model", default=None, help="model source (overrides the settings)")
    serve.set_defaults(func=cmd_serve)

    fetch = sub.add_parser(
        "fetch",
        help="make a model available locally and verify it",
        description="Make a model available locally and verify it. Exit status: 0 done, "
        f"{EXIT_TEMPORARY} a failure that may pass (network, server), 1 or 2 one that will not.",
    )
    fetch.add_argument("source", nargs="?", default=None, help="model source (default: settings)")
    fetch.add_argument("--sha256", default=None, help="expected sha256 of the file")
    fetch.add_argument(
        "--retry-for",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="try again after a failure that may pass (network, HTTP 408/429/5xx) until SECONDS "
        "have passed since the first try (default 0: exit at once)",
    )
    fetch.add_argument(
        "--retry-delay",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="the first wait before trying again; each next one doubles (default 5)",
    )
    fetch.add_argument(
        "--retry-max-delay",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="the longest wait between tries (default 300); each is 50-100%% of it, at random",
    )
    fetch.set_defaults(func=cmd_fetch)

    info = sub.add_parser("info", help="print a model's metadata")
    info.add_argument("source", nargs="?", default=None, help="model source (default: settings)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    inst = sub.add_parser("install", help="install the systemd units and the NGINX site")
    inst.add_argument("--root", type=Path, default=Path("/"), help="write under this root")
    inst.add_argument("--listen", default="80", help="NGINX's listen address or port")
    inst.add_argument("--port", type=int, default=8000, help="the app's port on 127.0.0.1")
    inst.add_argument(
        "--lb-subnet",
        default="10.0.0.0/16",
        help="the load balancer's subnet: X-Forwarded-For is trusted from it only",
    )
    inst.add_argument("--no-start", action="store_true", help="write files only")
    inst.set_defaults(func=cmd_install)

    batch = sub.add_parser(
        "batch",
        help="run a task over every row of a data set",
        description="Run a task over every row of INPUT (JSONL, CSV or a directory of text "
        "files; a path or s3://, oci://, gs:// URL) and append one JSON line per row to OUTPUT. "
        "Rerunning the same command skips the rows OUTPUT already has; an OUTPUT that is INPUT "
        "or holds lines a batch job did not write is refused and left as it is. Exit status: 0 "
        "all rows done, 3 some rows failed (see their error field), 1 the job could not run.",
    )
    batch.add_argument("input")
    batch.add_argument("output")
    batch.add_argument(
        "--task",
        required=True,
        choices=["sentiment", "classify", "summarize", "template", "embed"],
        help="embed: each row's text as a vector (/v1/embeddings with --target)",
    )
    batch.add_argument("--labels", help="comma-separated labels (classify; sentiment's own)")
    batch.add_argument("--template", help="the prompt, {field} from the row; @FILE reads a file")
    batch.add_argument("--schema", help="template: a JSON schema file the answer must match")
    batch.add_argument("--system", help="template: a system message")
    batch.add_argument(
        "--id-field", default="id", help='the row\'s id (default: id; else {"line": n})'
    )
    batch.add_argument("--text-field", default="text", help="the text to work on (default: text)")
    batch.add_argument("--format", choices=["jsonl", "csv", "docs"], help="default: from the name")
    batch.add_argument("--target", help="a node's or the balancer's URL (default: in-process)")
    batch.add_argument(
        "--api-key", help="bearer key for --target (or $GGUF_APPLIANCE_BATCH_API_KEY)"
    )
    batch.add_argument("--model", default="default", help="model name sent to --target")
    batch.add_argument("--model-source", default=None, help="in-process model (default: settings)")
    batch.add_argument("--concurrency", type=int, help="calls at once (default: slots, or 8)")
    batch.add_argument("--max-tokens", type=int, default=256, help="summary/answer length")
    batch.add_argument("--temperature", type=float, default=0.0, help="template only")
    batch.add_argument("--chunk-chars", type=int, default=3000, help="summarize: chunk size")
    batch.add_argument("--retries", type=int, default=8, help="retries per call on 429/503/errors")
    batch.add_argument("--endpoint-url", help="S3-compatible endpoint (OCI Object Storage's)")
    batch.add_argument(
        "--checkpoint-seconds", type=float, default=30.0, help="remote output upload interval"
    )
    batch.set_defaults(func=cmd_batch)

    bench = sub.add_parser(
        "bench",
        help="measure this node's speed and print the settings that suit it",
        description="Measure prompt reading and generation rates of the model at several thread "
        "counts and sequences per batch, print them as a table and recommend THREADS, N_SLOTS "
        "and whether another quantisation of the model suits this CPU better. Run it on an "
        "idle node (stop gguf-appliance first). Under an emulator it says its figures are "
        "meaningless. The default run takes about a minute with the bundled model.",
    )
    bench.add_argument("--model", default=None, help="model source (default: settings)")
    bench.add_argument(
        "--threads", type=_counts, help="thread counts, e.g. 1,2,3 (default: around the cores)"
    )
    bench.add_argument(
        "--sequences", type=_counts, help="sequences per batch, e.g. 1,4,8 (default: up to slots)"
    )
    bench.add_argument("--prompt-tokens", type=_positive, default=64, help="prompt length (64)")
    bench.add_argument("--gen-tokens", type=_positive, default=32, help="tokens generated (32)")
    bench.add_argument("--rounds", type=_positive, default=2, help="runs per cell, best kept (2)")
    bench.add_argument("--json", type=Path, default=None, help="also write the results here")
    bench.set_defaults(func=cmd_bench)

    vault = sub.add_parser(
        "vault-secrets",
        help="write the API keys and the Hugging Face token from OCI Vault secrets",
        description="Read the OCI Vault secrets the settings name (OCI_API_KEY_SECRETS, "
        "OCI_HF_TOKEN_SECRET) and replace the key file (as sha256: digests) and the token "
        "file, mode 0600. Nothing named: nothing done. A secret that cannot be read leaves both "
        f"files as they were; exit status {EXIT_TEMPORARY} (the Vault may answer later).",
    )
    vault.add_argument("--key-file", type=Path, default=Path("/etc/gguf-appliance/api-keys"))
    vault.add_argument("--hf-token-file", type=Path, default=Path("/etc/gguf-appliance/hf-token"))
    vault.set_defaults(func=cmd_vault_secrets)

    metrics = sub.add_parser(
        "oci-metrics",
        help="post the node's load (its /metrics on loopback) to OCI Monitoring until stopped",
        description="Every OCI_METRICS_INTERVAL seconds, read the node's /metrics at HOST:PORT "
        "and post its load to OCI Monitoring (OCI_METRICS_COMPARTMENT; unset: exit at once).",
    )
    metrics.set_defaults(func=cmd_oci_metrics)
    settings = sub.add_parser("settings", help="print the effective settings")
    settings.add_argument("--markdown", action="store_true", help="the table of every setting")
    settings.set_defaults(func=cmd_settings)
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModelError as exc:
        from .downloads import FetchUnavailable

        print(f"gguf-appliance: {exc.message}", file=sys.stderr)
        return EXIT_TEMPORARY if isinstance(exc, FetchUnavailable) else 1
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"]))
        print(f"gguf-appliance: invalid setting {where}: {first['msg']}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyFileError) as exc:
        print(f"gguf-appliance: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"gguf-appliance: cannot read {exc.filename}: permission denied", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
