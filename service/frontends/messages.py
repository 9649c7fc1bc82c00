"""What the primary process and its secondary HTTP front ends exchange, framed by :mod:`service.workers.codec`.

Secondary to primary: :class:`Hello` once, then :class:`Forward` for the inference requests of one version that
arrived in one turn of the event loop (their decoded, validated input tensors, concatenated) and :class:`MetricsText`
when asked. Primary to secondary: :class:`Catalog` (the served versions, whenever they change), :class:`Forwarded`
for the requests answered in one turn of the loop (their rows, concatenated: one frame per batch, not per request),
:class:`Refused` per request the batcher refused or failed, and :class:`MetricsRequest` at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.workers.codec import register
from service.workers.messages import Outputs


@dataclass(frozen=True)
class Hello:
    """A secondary front end connected (``index`` 1.., its process id)."""

    index: int
    pid: int


@dataclass(frozen=True)
class CatalogEntry:
    """One served model version, as a front end needs it to validate requests and resolve versions.

    ``generation`` changes when the primary replaces the version's object (a reload), so the mirror is rebuilt;
    ``config`` is the model's config.json as validated JSON.
    """

    name: str
    version: int
    generation: int
    path: str
    config: str
    state: str
    live_workers: int


@dataclass(frozen=True)
class Catalog:
    """Every served model version (sent on connect and whenever a version appears, goes or changes state)."""

    versions: tuple[CatalogEntry, ...]


@dataclass(frozen=True)
class Forward:
    """Queue requests (already checked against the version's signature) on the version's batcher: request
    ``request_ids[i]`` is ``array[offsets[i]:offsets[i + 1]]``."""

    model: str
    version: int
    request_ids: tuple[int, ...]
    array: np.ndarray
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Forwarded:
    """The rows of answered requests: request ``request_ids[i]`` gets rows ``offsets[i]:offsets[i + 1]``."""

    request_ids: tuple[int, ...]
    outputs: Outputs
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Refused:
    """A request the primary's batcher refused or failed: ``error_kind`` (a ServeError class name) and ``error``;
    ``samples``: a NonFiniteOutput's sample indices."""

    request_id: int
    error_kind: str
    error: str
    samples: tuple[int, ...] = ()


@dataclass(frozen=True)
class MetricsRequest:
    """Send your Prometheus exposition (answered with :class:`MetricsText` and the same ``token``)."""

    token: int


@dataclass(frozen=True)
class MetricsText:
    """A secondary's own Prometheus text exposition."""

    token: int
    text: str


FrontendMessage = Hello | Catalog | Forward | Forwarded | Refused | MetricsRequest | MetricsText

register(Hello, CatalogEntry, Catalog, Forward, Forwarded, Refused, MetricsRequest, MetricsText)
