"""Server settings, read from ``CAPSA_*`` environment variables (and overridable by CLI options).

Field names are part of the deployment contract: each field ``foo`` is the environment variable ``CAPSA_FOO``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capsa.manifest import parse_allowed_modules

MIB = 1024 * 1024
#: The built-in demo's architecture (service.demo.ARCHITECTURE): the only code a server runs by default.
DEMO_ARCHITECTURE = "service.demo:build_demo_model"


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
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Port of the KServe V2 gRPC service and grpc.health.v1, on the same host "
                                          "(0: no gRPC)."
    )
    http_processes: int = Field(
        1, ge=1, le=64, description="HTTP front-end processes listening on the port (SO_REUSEPORT), sharing the "
                                    "model workers and their batches: above 1 when one Python process's HTTP "
                                    "handling is the bottleneck and cores are free (service.frontends)."
    )
    http_main_serves: bool = Field(
        True, description="With CAPSA_HTTP_PROCESSES > 1: the main process (models, batching, gRPC) serves HTTP on "
                          "the port too; false: all CAPSA_HTTP_PROCESSES are front ends and the main process only "
                          "batches their requests (one more process; for machines with many cores)."
    )
    max_grpc_connections: int | None = Field(
        None, ge=1, description="Open gRPC client connections beyond which new ones are closed at once (the client "
                                "sees UNAVAILABLE). Default: a quarter of the connection budget (the open-file limit "
                                "minus a reserve), at most half; CAPSA_MAX_CONNECTIONS gets the rest."
    )
    devices: str = Field(
        "auto", description='"auto" (every visible CUDA device, else the CPU), "cpu", or "cuda:0,cuda:1".'
    )
    workers_per_device: int | None = Field(
        None, ge=1, description="Worker processes per device per model version; overrides each model's instances."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads in each CPU worker, unless the model's config.json sets "
                                "torch_threads (default: see service.model_config.worker_torch_threads)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for the repository routes; without it those routes answer 403."
    )
    infer_token: SecretStr | None = Field(
        None, description="Optional bearer token required by the inference routes."
    )
    max_request_bytes: int = Field(
        64 * MIB, ge=1, description="Largest accepted request body (else 413); binary tensor requests."
    )
    max_json_request_bytes: int = Field(
        8 * MIB, ge=1,
        description="Largest accepted JSON body (else 413): V1, V2 without binary data, and the JSON header of a "
                    "binary request. Lower than max_request_bytes because parsed JSON takes ~10x its size in memory.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send a request's complete headers within this time (else it is "
                                "closed): from the connection's start or from a request's first byte."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request's body must arrive within this time after its headers (else 408)."
    )
    keep_alive_timeout_s: float = Field(
        75.0, gt=0, description="Idle keep-alive connections are closed after this time; keep it above the idle "
                                "timeout of the proxy in front (60 s on most load balancers)."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request line plus headers (else 431 and the connection closes)."
    )
    max_connections: int | None = Field(
        None, ge=1, description="Open client connections beyond which new ones get 503 and are closed. Default: "
                                "the open-file limit minus a reserve for worker pipes and files (see cli.py)."
    )
    shutdown_grace_s: float = Field(
        2.0, ge=0, description="On SIGTERM, how long idle keep-alive connections stay open, so that a request "
                               "already on its way is answered (with Connection: close) instead of reset."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of an inference request, queueing included (else 504)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    worker_start_timeout_s: float = Field(
        300.0, gt=0, description="How long a worker may take to load and warm up its model."
    )
    busy_poll_us: int = Field(
        0, ge=0, le=1_000_000,
        description="Busy-poll window in microseconds (0: off): workers poll their socket, and the HTTP process's "
                    "event loop keeps polling, this long after each batch instead of sleeping at once; lower latency "
                    "at low load for CPU time (see service.busypoll).",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After value (seconds) sent with 503 answers.")
    cache_dir: str | None = Field(
        None, description="Local cache for bundles fetched from a remote registry, and for the demo model."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False,
        description="fsspec storage options for a remote registry (JSON object; may hold secrets: never printed).",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the JSON logs."
    )
    access_log: bool = Field(True, description="Write one JSON access log line per request.")
    drift_window: int = Field(
        1000, ge=10, description="Samples in the sliding window of capsa_risk_drift (calibrated models only): the "
                                 "binomial z-score of the share of recent samples above the 0.9 risk percentile."
    )
    demo: bool = Field(False, description="Build a small demo model into a local registry and serve it.")
    allowed_modules: str = Field(
        DEMO_ARCHITECTURE,
        description="Comma-separated code bundles may run: dotted module prefixes (\"acme.models\") or exact "
                    "factories (\"acme.models:build\"); \"architecture\" allows bundle-local code. A model's "
                    "config.json can only narrow it. Default: only the built-in demo's factory.",
    )
    repository_poll_s: float = Field(
        0.0, ge=0, description="Poll the registry every N seconds and load, reload or unload what changed "
                               "(0: off; then only startup and the repository routes load models)."
    )
    strict_readiness: bool = Field(
        False, description="Ready only when every model version is loaded (Triton's strict readiness); by default "
                           "ready once every version has loaded or failed with a reason and one model serves."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("allowed_modules")
    @classmethod
    def _check_allowed_modules(cls, value: str) -> str:
        parse_allowed_modules(value, setting="CAPSA_ALLOWED_MODULES")
        return value

    def allowed_module_list(self) -> list[str]:
        """``CAPSA_ALLOWED_MODULES`` as a list: the operator's allow-list of code that bundles may run."""
        return parse_allowed_modules(self.allowed_modules, setting="CAPSA_ALLOWED_MODULES")

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
