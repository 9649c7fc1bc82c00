"""Server settings, read from ``CAPSA_*`` environment variables (and overridable by CLI options).

Field names are part of the deployment contract: each field ``foo`` is the environment variable ``CAPSA_FOO``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything ``capsa-serve`` can be told; every field is also ``CAPSA_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="CAPSA_", extra="ignore", protected_namespaces=(), validate_default=True
    )

    model_repository: str = Field(
        "", description="Registry root: a local directory or an fsspec URL such as s3://bucket/prefix."
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    devices: str = Field(
        "auto", description='"auto" (every visible CUDA device, else the CPU), "cpu", or "cuda:0,cuda:1".'
    )
    workers_per_device: int | None = Field(
        None, ge=1, description="Worker processes per device per model version; overrides each model's instances."
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads in each CPU worker.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the repository routes; without it those routes answer 403."
    )
    infer_token: SecretStr | None = Field(
        None, description="Optional bearer token required by the inference routes."
    )
    max_request_bytes: int = Field(64 * MIB, ge=1, description="Largest accepted request body (else 413).")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of an inference request, queueing included (else 504)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    worker_start_timeout_s: float = Field(
        300.0, gt=0, description="How long a worker may take to load and warm up its model."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After value (seconds) sent with 503 answers.")
    cache_dir: str | None = Field(
        None, description="Local cache for bundles fetched from a remote registry, and for the demo model."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for a remote registry (JSON object)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the JSON logs."
    )
    access_log: bool = Field(True, description="Write one JSON access log line per request.")
    demo: bool = Field(False, description="Build a small demo model into a local registry and serve it.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        parse_devices(value)
        return value


def parse_devices(spec: str) -> list[str] | None:
    """Parse a devices setting: ``None`` for "auto", else the explicit list (validated)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return None
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    if not devices:
        raise ValueError("devices: empty list")
    for device in devices:
        if device == "cpu":
            continue
        if device.startswith("cuda:") and device[5:].isdigit():
            continue
        raise ValueError(f"devices: {device!r} is not 'cpu' or 'cuda:N'")
    return devices
