"""How one model of the registry is served: ``ROOT/<model>/config.json``, validated with pydantic.

The file is optional (every field has a default). Unknown keys and bad values are refused with a
:class:`ConfigError` that names the file and the field, so a typo never silently falls back to a default.

Example::

    {"max_batch_size": 32, "max_batch_delay_ms": 2.0, "instances": 2,
     "version_policy": {"latest": {"num_versions": 2}}, "risk_threshold": 0.5,
     "allowed_modules": ["acme.models"]}
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from capsa.manifest import check_allowed_entry


class ConfigError(ValueError):
    """A model's ``config.json`` is unreadable or invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LatestPolicy(_Strict):
    """Serve the ``num_versions`` highest versions."""

    num_versions: int = Field(1, ge=1)


class AllPolicy(_Strict):
    """Serve every version present."""


class SpecificPolicy(_Strict):
    """Serve exactly the listed versions (those present)."""

    versions: list[int] = Field(min_length=1)

    @field_validator("versions")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError("versions are positive integers")
        return sorted(set(value))


class VersionPolicy(_Strict):
    """Triton-style version policy: exactly one of ``latest``, ``all`` or ``specific``.

    JSON: ``{"latest": {"num_versions": 1}}``, ``{"all": {}}`` or ``{"specific": {"versions": [1, 3]}}``.
    """

    latest: LatestPolicy | None = None
    all: AllPolicy | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f'give exactly one of "latest", "all" or "specific" (got {", ".join(chosen) if chosen else "none"})'
            )
        return self

    @classmethod
    def latest_n(cls, num_versions: int = 1) -> VersionPolicy:
        """The policy serving the ``num_versions`` highest versions."""
        return cls(latest=LatestPolicy(num_versions=num_versions))

    @property
    def kind(self) -> str:
        """``"latest"``, ``"all"`` or ``"specific"``."""
        return "latest" if self.latest else "all" if self.all else "specific"

    def describe(self) -> str:
        """Short human text, e.g. ``latest 2`` or ``specific [1, 3]``."""
        if self.latest:
            return f"latest {self.latest.num_versions}"
        if self.specific:
            return f"specific {self.specific.versions}"
        return "all"

    def select(self, available: list[int]) -> list[int]:
        """The versions of ``available`` this policy serves, ascending."""
        present = sorted(set(available))
        if self.latest:
            return present[-self.latest.num_versions :]
        if self.specific:
            wanted = set(self.specific.versions)
            return [v for v in present if v in wanted]
        return present

    def to_json_dict(self) -> dict[str, Any]:
        """The Triton-style JSON object."""
        return self.model_dump(exclude_none=True)


def _default_policy() -> VersionPolicy:
    return VersionPolicy.latest_n(1)


class ModelConfig(BaseModel):
    """Serving settings of one model (``ROOT/<model>/config.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_batch_size: int = Field(64, ge=1, description="Most samples per batch given to the model.")
    max_batch_delay_ms: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="How long a batch may wait for more requests."
    )
    max_queue_size: int = Field(1024, ge=1, description="Queued requests before the server answers 503.")
    instances: int = Field(1, ge=1, description="Worker processes per device for each served version.")
    version_policy: VersionPolicy = Field(default_factory=_default_policy)
    risk_threshold: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Risk above which a prediction is flagged."
    )
    risk_percentile_threshold: float | None = Field(
        None, gt=0, lt=1, description="Calibrated bundles only: flag samples riskier than this share of the "
                                      "calibration data (0.99 flags about 1% of normal traffic); takes precedence "
                                      "over risk_threshold."
    )
    allowed_modules: list[str] | None = Field(
        None, description="Narrows the server's CAPSA_ALLOWED_MODULES for this model (never widens it): module "
                          "prefixes or 'module:factory' entries (None: the server's list as it is)."
    )
    allow_non_finite: bool = Field(False, description="Accept NaN/inf inputs instead of answering 400.")
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads in each CPU worker of this model; overrides "
                                         "CAPSA_TORCH_THREADS (None: that, else the default of worker_torch_threads())."
    )
    interop_threads: int = Field(
        1, ge=1, le=1024, description="torch inter-op threads in each worker (1: a worker runs one batch at a time, "
                                      "so more only add idle threads)."
    )

    @field_validator("allowed_modules")
    @classmethod
    def _module_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for name in value:
                check_allowed_entry(name)  # ValueError naming the entry
        return value

    @field_validator("max_batch_delay_ms", "risk_threshold")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str) -> ModelConfig:
        """Parse and validate a ``config.json``; :class:`ConfigError` names ``source`` and the bad field."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{source}: invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {format_validation_error(exc)}") from None

    def select_versions(self, available: list[int]) -> list[int]:
        """The versions of ``available`` served under this model's version policy, ascending."""
        return self.version_policy.select(available)


#: The default never gives a CPU worker more intra-op threads than this: a served batch is small, and beyond a few
#: threads torch's parallel regions cost more to start and to spin down than they save.
MAX_DEFAULT_TORCH_THREADS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def worker_torch_threads(configured: int | None, server_default: int | None, cpu_workers: int,
                  cores: int | None = None) -> int:
    """Intra-op threads for each CPU worker of a model version: its ``config.json`` ``torch_threads``, else
    CAPSA_TORCH_THREADS, else the cores available to the server minus one (the HTTP process runs on one core at
    full load) shared equally by the version's ``cpu_workers``, between 1 and :data:`MAX_DEFAULT_TORCH_THREADS`.
    On a 2-core machine with one worker that is 1: the worker and the HTTP process each get a core."""
    if configured is not None:
        return configured
    if server_default is not None:
        return server_default
    cores = available_cores() if cores is None else cores
    return max(1, min((cores - 1) // max(cpu_workers, 1), MAX_DEFAULT_TORCH_THREADS))


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)
