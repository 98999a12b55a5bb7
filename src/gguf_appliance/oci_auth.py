"""How the node signs its calls to OCI (Monitoring, Vault secrets): as the instance, or with a
config file.

On OCI the node authenticates as itself (instance principals): the SDK's signer asks the
instance metadata service for the instance's certificate and swaps it for a session token, so no
credential is ever written to the node. `config_file` signs with an API key from an OCI config
file instead: for a machine outside OCI, and for the tests, whose stand-in endpoints cannot
stand in for the metadata service and its certificates.

The SDK is an optional extra (`pip install gguf-appliance[oci]`); it is imported only when a
feature that needs it is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OciAuth = Literal["instance_principal", "config_file"]


class OciUnavailable(RuntimeError):
    """The OCI SDK is not installed, or the node cannot sign as configured."""


@dataclass(frozen=True)
class OciCredentials:
    """What an SDK client is made with: a config dict, a signer (or None), and the region."""

    config: dict[str, Any]
    signer: Any
    region: str


def import_oci() -> Any:
    try:
        import oci
    except ImportError:
        raise OciUnavailable(
            "the OCI SDK is not installed: pip install 'gguf-appliance[oci]'"
        ) from None
    return oci


def oci_credentials(
    auth: OciAuth,
    *,
    config_file: Path | None = None,
    profile: str = "DEFAULT",
    region: str | None = None,
) -> OciCredentials:
    """Credentials for SDK clients. Instance principals ask the metadata service (once, here)."""
    oci = import_oci()
    if auth == "instance_principal":
        try:
            signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
        except Exception as exc:  # the SDK raises many kinds; none may stop the node
            raise OciUnavailable(
                f"cannot sign as the instance (instance principals): {exc}"
            ) from None
        return OciCredentials({"region": region or signer.region}, signer, region or signer.region)
    path = str(config_file) if config_file else oci.config.DEFAULT_LOCATION
    try:
        config = oci.config.from_file(path, profile)
        oci.config.validate_config(config)
    except Exception as exc:
        raise OciUnavailable(f"cannot use the OCI config file {path} [{profile}]: {exc}") from None
    if region:
        config["region"] = region
    return OciCredentials(config, None, config["region"])


def client_options(
    credentials: OciCredentials, endpoint: str | None, timeout: float
) -> dict[str, Any]:
    """Keyword arguments for an SDK client: one try per call (the caller decides when to try
    again), no circuit breaker state, and `timeout` seconds to connect and to read."""
    oci = import_oci()
    options: dict[str, Any] = {
        "retry_strategy": oci.retry.NoneRetryStrategy(),
        "circuit_breaker_strategy": oci.circuit_breaker.NoCircuitBreakerStrategy(),
        "timeout": (timeout, timeout),
    }
    if credentials.signer is not None:
        options["signer"] = credentials.signer
    if endpoint:
        options["service_endpoint"] = endpoint
    return options
