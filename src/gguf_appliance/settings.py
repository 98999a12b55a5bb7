from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .keys import MIN_KEY_LENGTH

ENV_PREFIX = "GGUF_APPLIANCE_"
# The KV cache's number types (llama.KV_TYPES has llama.cpp's numbers for them).
KvCacheType = Literal["f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
DEFAULT_ENV_FILE = Path("/etc/gguf-appliance/appliance.env")
DEFAULT_MODEL = "bundled:smollm2-135m-instruct-q4_1"
DEFAULT_MODELS_DIR = Path("/var/lib/gguf-appliance/models")


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0))
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=None,
        extra="ignore",
        validate_default=True,
    )

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Model source: `bundled:NAME`, `hf://OWNER/REPO/FILE.gguf[@REV]`, "
        "`https://.../FILE.gguf` (`http://` only with MODEL_SHA256), a local path or `file://` "
        "URL.",
    )
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Expected sha256 of the model file; the model is refused if it differs.",
    )
    models_dir: Path = Field(
        DEFAULT_MODELS_DIR,
        description="Directory that holds fetched models.",
    )
    progress_interval: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds between download progress lines when not on a terminal.",
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Chat template: a Jinja file (a path with a `/` or ending in `.jinja`, at "
        "most 128 KiB) or the name of one built into llama.cpp (`chatml`, `gemma`, `llama3`, "
        "...). Default: the GGUF's own; for a GGUF without one, its architecture's (gemma3: "
        "`gemma`), else `chatml`. A bad one: the model is not served, /health/ready says why.",
    )
    model_alias: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Model id shown by /v1/models (default: the file name without .gguf).",
    )
    n_ctx: int = Field(
        2048,
        ge=256,
        le=131072,
        description="Context of each request in tokens: prompt and answer together.",
    )
    n_slots: int = Field(
        8,
        ge=1,
        le=64,
        description="Requests decoded together in one batch; the KV cache holds n_slots * n_ctx.",
    )
    n_batch: int = Field(
        512,
        ge=32,
        le=8192,
        description="Most prompt tokens evaluated in one decode step.",
    )
    kv_cache_type: KvCacheType = Field(
        "f16",
        description=(
            "Number type of the KV cache's keys and values (f16, bf16, f32, q8_0, q5_1, q5_0, "
            "q4_1, q4_0 or iq4_nl): q8_0 takes about half f16's memory per slot; "
            "docs/benchmarks.md measures each type's cost."
        ),
    )
    prefill_chunk: int = Field(
        256,
        ge=8,
        le=8192,
        description=(
            "Most prompt tokens read per step while others stream: fewer keep the streams "
            "smoother, more read long prompts faster (docs/benchmarks.md)."
        ),
    )
    reuse_prefix: bool = Field(
        True,
        description="Keep each slot's KV after a request; a prompt that starts alike reuses it.",
    )
    stream_interval: float = Field(
        0.02,
        ge=0,
        le=1,
        description=(
            "Seconds between a stream's token events: text decoded meanwhile goes in one event "
            "(0: an event per token)."
        ),
    )
    ping_interval: float = Field(
        15.0,
        ge=0.1,
        le=3600,
        description="Seconds between keep-alive comments on a stream that sends nothing else.",
    )
    threads: int = Field(
        default_factory=physical_cores,
        ge=1,
        le=512,
        description="CPU threads for decoding (default: the physical cores).",
    )
    host: str = Field("127.0.0.1", min_length=1, description="Address the server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the server listens on.")
    queue_size: int = Field(
        16,
        ge=0,
        le=10000,
        description="Requests that may wait for a free slot; beyond it the server answers 503.",
    )
    max_tokens_cap: int = Field(
        2048,
        ge=1,
        le=131072,
        description="Largest max_tokens a request may ask for.",
    )
    default_max_tokens: int = Field(
        512,
        ge=1,
        le=131072,
        description="max_tokens of a request that gives none (never above max_tokens_cap).",
    )
    request_timeout: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="Seconds a request may take, queue wait included, before it is ended.",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds in-flight streams get to finish after SIGTERM.",
    )
    retry_after: int = Field(
        2,
        ge=1,
        le=3600,
        description="Retry-After seconds sent with 503 when the queue is full.",
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest request body in bytes; a larger one gets 413.",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        le=131072,
        description="Largest prompt in tokens (default: the context less one); a longer one gets "
        "400.",
    )
    allow_grammar: bool = Field(
        True,
        description="Accept raw GBNF grammars in a request's `grammar` field (JSON schemas in "
        "`response_format` stay allowed); off, such a request gets 400.",
    )
    embedding_model: str | None = Field(
        None,
        min_length=1,
        description="Model source of /v1/embeddings (any MODEL source, fetched and verified the "
        "same way; listed by /v1/models); default: the chat model's own file.",
    )
    embedding_model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Expected sha256 of EMBEDDING_MODEL's file; refused if it differs.",
    )
    embedding_ctx: int = Field(
        512,
        ge=16,
        le=131072,
        description="Longest /v1/embeddings input in tokens (never above what the model was "
        "trained on); a longer one gets 400, never cut.",
    )
    embedding_max_tokens: int = Field(
        8192,
        ge=16,
        le=1_048_576,
        description="Most tokens of one /v1/embeddings request, all its inputs together; more "
        "gets 400.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys required on /generate and /v1 (comma-separated). With no key "
        "here nor in the key file, see open_api.",
    )
    api_key_file: Path | None = Field(
        None,
        description="File of more bearer keys, one a line (`sha256:HEX`: a key's SHA-256; `#` "
        "starts a comment line); read again on SIGHUP (`systemctl reload gguf-appliance`). "
        "Missing, unreadable or holding no key: the node does not start, a reload keeps the "
        "keys in force.",
    )
    open_api: bool = Field(
        False,
        description="Serve /generate and /v1 with no API key. Off, a node with no key refuses to "
        "start, unless no key file is set and it listens on loopback only (127.0.0.1, as "
        "`make run`); keys, if given, are required either way.",
    )
    key_concurrency: int = Field(
        16,
        ge=1,
        le=10000,
        description="Requests in flight per API key on /generate and /v1; more gets 429 (keyed "
        "requests pass NGINX's per-address limits: the node limits them by key).",
    )
    key_rate: float = Field(
        20.0,
        gt=0,
        le=10000,
        description="Requests a second per API key on /generate and /v1, with a burst of 5 "
        "seconds' worth; more gets 429.",
    )
    batch_key_concurrency: int = Field(
        32,
        ge=1,
        le=10000,
        description="key_concurrency for a batch key (a `batch:` line of the key file).",
    )
    batch_key_rate: float = Field(
        50.0,
        gt=0,
        le=10000,
        description="key_rate for a batch key (a `batch:` line of the key file).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names an open API (no key) answers to, besides IP addresses and "
        "`localhost` (comma-separated; `*`: any). Another name gets 421: a web page whose "
        "name was re-pointed at this node (DNS rebinding) cannot use it. Not checked with keys.",
    )
    health_requires_key: bool = Field(
        False,
        description="Require an API key on /health/live and /health/ready too (the load "
        "balancer's check must then send one).",
    )
    metrics_requires_key: bool = Field(
        False,
        description="Require an API key on /metrics too (Prometheus sends it as a bearer token).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (comma-separated); empty: CORS off.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format: `json` writes one JSON object a line."
    )
    log_prompts: bool = Field(
        False,
        description="Put each request's prompt and answer in its log line; off, they are never "
        "logged.",
    )
    oci_auth: Literal["instance_principal", "config_file"] = Field(
        "instance_principal",
        description="How the node signs its calls to OCI Monitoring and Vault: as the instance "
        "(instance principals, on OCI), or with the API key of an OCI config file.",
    )
    oci_config_file: Path | None = Field(
        None, description="OCI config file for oci_auth=config_file (default ~/.oci/config)."
    )
    oci_config_profile: str = Field(
        "DEFAULT", min_length=1, description="Profile of oci_config_file."
    )
    oci_region: str | None = Field(
        None, description="OCI region of the endpoints (default: the instance's, or the config's)."
    )
    oci_metrics_compartment: str | None = Field(
        None,
        min_length=1,
        description="OCID of the compartment to post the node's load to (OCI Monitoring custom "
        "metrics, docs/oci-scaling.md); unset: nothing is posted.",
    )
    oci_metrics_namespace: str = Field(
        "gguf_appliance",
        pattern=r"^[a-z][a-z0-9_]{0,255}$",
        description="Custom metric namespace of the node's load (not starting with `oci_`).",
    )
    oci_metrics_pool: str = Field(
        "gguf-appliance", min_length=1, description="The `pool` dimension of the load metrics."
    )
    oci_metrics_resource_id: str | None = Field(
        None,
        description="The `resourceId` dimension of the load metrics (default: the instance's "
        "OCID from the metadata service, else the host name).",
    )
    oci_metrics_interval: float = Field(
        60.0, ge=0.05, le=3600, description="Seconds between two posts of the node's load."
    )
    oci_metrics_timeout: float = Field(
        10.0, gt=0, le=120, description="Seconds a post of the node's load may take."
    )
    oci_monitoring_endpoint: str | None = Field(
        None,
        description="Monitoring ingestion endpoint (default: "
        "https://telemetry-ingestion.REGION.oraclecloud.com).",
    )
    oci_api_key_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="OCIDs of OCI Vault secrets holding API keys, one key (or `sha256:HEX`) a "
        "line (comma-separated); `gguf-appliance vault-secrets` writes them to the key file.",
    )
    oci_hf_token_secret: str | None = Field(
        None,
        description="OCID of an OCI Vault secret holding a Hugging Face token, for gated models.",
    )
    oci_secrets_timeout: float = Field(
        10.0, gt=0, le=120, description="Seconds a read of an OCI Vault secret may take."
    )
    oci_secrets_endpoint: str | None = Field(
        None,
        description="Vault secrets endpoint (default: "
        "https://secrets.vaults.REGION.oci.oraclecloud.com).",
    )

    _split_lists = field_validator(
        "api_keys", "cors_origins", "allowed_hosts", "oci_api_key_secrets", mode="before"
    )(_split_list)

    @field_validator("oci_metrics_namespace")
    @classmethod
    def _namespace_not_oracles(cls, namespace: str) -> str:
        if namespace.startswith("oci_"):
            raise ValueError("a custom metric namespace cannot start with oci_ (OCI's own)")
        return namespace

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < MIN_KEY_LENGTH or any(ch.isspace() for ch in key):
                raise ValueError(
                    f"each API key is one word of at least {MIN_KEY_LENGTH} characters"
                )
        return keys

    @property
    def effective_default_max_tokens(self) -> int:
        return min(self.default_max_tokens, self.max_tokens_cap)


def load_settings(env_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and an env file.

    The file is `env_file`, else `$GGUF_APPLIANCE_ENV_FILE`, else the default path when it
    exists. A file named explicitly must exist. `GGUF_APPLIANCE_ENV_FILE=` (empty) reads no file:
    the systemd units set it, as systemd has already put the file's values in the environment.
    Environment variables win over the file.
    """
    from_environment = os.environ.get(ENV_PREFIX + "ENV_FILE")
    if env_file is None and from_environment == "":
        return Settings(**overrides)
    explicit = env_file or from_environment
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"env file not found: {path}")
    else:
        path = DEFAULT_ENV_FILE
        if not path.is_file():
            return Settings(**overrides)
    return Settings(_env_file=path, **overrides)  # type: ignore[call-arg]
