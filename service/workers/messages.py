"""The messages parent and worker exchange: frozen dataclasses, encoded without pickle by :mod:`.codec`.

Parent to worker: :class:`RunBatch`, :class:`Stop`. Worker to parent: :class:`Ready` or :class:`LoadFailed` once,
then one :class:`Result` per batch. A result's outcome is :class:`Outputs` (the whole batch), :class:`Split` (the batch
failed, so each request was run alone: one part per request) or :class:`Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to load and warm up its model version (passed once, at spawn)."""

    bundle_path: str
    device: str
    input_shape: tuple[int, ...]  # the model's input shape, -1 for variable dimensions
    input_dtype: str  # numpy dtype string
    allowed_modules: tuple[str, ...] | None
    torch_threads: int = 1  # intra-op threads (CPU workers)
    warmup_batch: int = 1
    interop_threads: int = 1
    busy_poll_s: float = 0.0  # after each batch, poll the socket this long before blocking (service.busypoll)


@dataclass(frozen=True)
class Ready:
    """The model is loaded and warmed up; ``threads``/``interop_threads``: torch's thread counts as set."""

    pid: int
    device: str
    threads: int = 0
    interop_threads: int = 0


@dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded; the worker exits after sending this."""

    error: str


@dataclass(frozen=True)
class RunBatch:
    """Run the model on ``array``: the rows of several requests, request ``i`` is ``offsets[i]:offsets[i + 1]``."""

    batch_id: int
    array: np.ndarray
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Stop:
    """Exit now (after the batch in progress, if any)."""


@dataclass(frozen=True)
class Outputs:
    """The model's outputs for a batch (or one request): one row per input row.

    ``components``: a composed model's named risks as ``(output name, array)`` pairs (``risk_aleatoric``, ...; only
    those its stack gives, see :mod:`service.components`); empty for a single wrapper.
    """

    prediction: np.ndarray
    risk: np.ndarray
    risk_score: np.ndarray
    components: tuple[tuple[str, np.ndarray], ...] = ()

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Rows ``lo:hi`` of each output (zero-copy views), as the batcher hands them to a request."""
        return (self.prediction[lo:hi], self.risk[lo:hi], self.risk_score[lo:hi],
                {name: array[lo:hi] for name, array in self.components})


@dataclass(frozen=True)
class Failed:
    """The model raised; ``error`` is ``"ExceptionType: message"``."""

    error: str


@dataclass(frozen=True)
class Split:
    """The batch failed as a whole, so each request ran alone: one part per request, in order."""

    parts: tuple[Outputs | Failed, ...]


Outcome = Outputs | Split | Failed


@dataclass(frozen=True)
class Result:
    """The answer to :class:`RunBatch` ``batch_id``; ``compute_s`` is the time the worker spent on it."""

    batch_id: int
    compute_s: float
    outcome: Outcome


ToWorker = RunBatch | Stop
FromWorker = Ready | LoadFailed | Result
Message = ToWorker | FromWorker | Outputs | Split | Failed

#: Every type the codec may build from the wire, by name (nothing else can be constructed by a peer).
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (Ready, LoadFailed, RunBatch, Stop, Outputs, Failed, Split, Result)
}
