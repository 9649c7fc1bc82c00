"""Which model versions are served: loading from the registry, worker pools, restarts, readiness, unloading.

A :class:`ModelVersion` owns a :class:`~service.batching.Batcher` and ``instances`` worker processes per device.
A worker that dies is restarted with exponential backoff while its batch is retried once elsewhere or failed with
503. :class:`ModelManager` maps model names to their served versions and reconciles them with the registry on
``load``; swapping versions happens only once the new ones are warm, so loading or unloading one model never drops
requests to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.batching import Batcher
from service.metrics import Metrics, VersionMetrics
from service.protocol import DATATYPES
from service.registry import Registry, RegistryError
from service.settings import Settings, parse_devices
from service.workers import WorkerProcess, WorkerSpec

log = logging.getLogger("capsa.serve.manager")

_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 30.0
_STABLE_AFTER_S = 30.0  # a worker that lived this long resets its slot's backoff


class NotFound(LookupError):
    """Unknown model or version (404)."""


class LoadError(RuntimeError):
    """A model could not be loaded; the message says why."""


def resolve_devices(spec: str) -> list[str]:
    """The devices to run workers on: the explicit list, or for "auto" every visible CUDA device, else the CPU.

    "auto" only imports torch (in this process) when a CUDA device could exist, keeping the HTTP process light.
    """
    devices = parse_devices(spec)
    if devices is not None:
        return devices
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ["cpu"]
    if visible is None and not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
        return ["cpu"]
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no usable torch/CUDA: serve on the CPU
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model's signature."""

    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict[str, Any]:
        """The V2 metadata form."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def read_signature(path: Path) -> tuple[TensorSpec, TensorSpec, dict[str, Any]]:
    """Read the input and ``prediction`` specs of a bundle from its capsa.json (no model code is imported)."""
    try:
        meta = orjson.loads((path / "capsa.json").read_bytes())
        inputs = [TensorSpec(t["name"], t["datatype"], list(t["shape"])) for t in meta["inputs"]]
        outputs = {t["name"]: TensorSpec(t["name"], t["datatype"], list(t["shape"])) for t in meta["outputs"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{path}: cannot read the signature in capsa.json: {exc}") from exc
    if len(inputs) != 1:
        raise LoadError(f"{path}: capsa models take exactly one input, capsa.json lists {len(inputs)}")
    if inputs[0].datatype not in DATATYPES:
        raise LoadError(f"{path}: input datatype {inputs[0].datatype} is not supported")
    if not inputs[0].shape:
        raise LoadError(f"{path}: the input has no batch dimension")
    prediction = outputs.get("prediction") or next(iter(outputs.values()), None)
    if prediction is None:
        raise LoadError(f"{path}: capsa.json lists no outputs")
    return inputs[0], prediction, meta


class ModelVersion:
    """One served model version: its signature, config, batcher and worker processes."""

    def __init__(self, name: str, version: int, path: Path, config: Any, settings: Settings,
                 metrics: Metrics, devices: list[str]) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.path = path
        self.config = config
        self.settings = settings
        self.input, self.prediction, self.meta = read_signature(path)
        self.max_batch_size = int(config.max_batch_size)
        self.allow_non_finite = bool(config.allow_non_finite)
        self.risk_threshold: float | None = config.risk_threshold
        self.metrics: VersionMetrics = metrics.for_version(name, version)
        self.batcher = Batcher(
            max_batch_size=self.max_batch_size,
            max_batch_delay_s=float(config.max_batch_delay_ms) / 1000.0,
            max_queue_size=int(config.max_queue_size),
            timeout_s=settings.request_timeout_s,
            metrics=self.metrics,
            on_stuck=self._on_stuck,
        )
        instances = settings.workers_per_device or int(config.instances)
        self.slots = [(device, i) for device in devices for i in range(instances)]
        self.workers: dict[int, WorkerProcess] = {}
        self._slot_of: dict[int, tuple[str, int]] = {}
        self._backoff: dict[tuple[str, int], float] = {}
        self._restarts: set[asyncio.Task] = set()
        self.state = "LOADING"  # LOADING | READY | UNAVAILABLE (failed) | UNLOADING
        self.reason = ""
        self.stopping = False
        self.superseded = False  # replaced by a reload of the same version: leave the shared gauge alone
        self._settled = asyncio.Event()

    # ---------------------------------------------------------------- status
    @property
    def ready(self) -> bool:
        """Loaded, warmed up and with at least one live worker."""
        return self.state == "READY" and self.batcher.live_workers > 0

    @property
    def weights_sha256(self) -> str | None:
        """The bundle's weights checksum (to tell whether a reload changed the model)."""
        return self.meta.get("weights_sha256")

    def status(self) -> dict[str, Any]:
        """State for the repository index."""
        state = "READY" if self.ready else ("LOADING" if self.state == "READY" else self.state)
        return {"name": self.name, "version": self.version_str, "state": state, "reason": self.reason}

    # ---------------------------------------------------------------- workers
    def start(self) -> None:
        """Spawn every worker; :meth:`wait_settled` tells when the version is ready or has failed."""
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: tuple[str, int]) -> None:
        device = slot[0]
        spec = WorkerSpec(
            bundle_path=str(self.path),
            device=device,
            input_shape=tuple(self.input.shape),
            input_dtype=DATATYPES[self.input.datatype].str,
            allowed_modules=tuple(self.config.allowed_modules) if self.config.allowed_modules is not None
            else None,
            torch_threads=self.settings.torch_threads,
            warmup_batch=min(self.max_batch_size, 8),
        )
        worker = WorkerProcess(
            spec, name=f"{self.name}-{self.version}-{device}-{slot[1]}", on_ready=self._on_ready,
            on_load_error=self._on_load_error, on_result=self.batcher.complete, on_exit=self._on_exit,
        )
        self.workers[worker.id] = worker
        self._slot_of[worker.id] = slot
        try:
            worker.start(self.settings.worker_start_timeout_s)
        except Exception as exc:  # e.g. cannot spawn: treat like a crash
            log.exception("cannot start worker", extra={"model": self.name, "version": self.version})
            self.workers.pop(worker.id, None)
            self._schedule_restart(slot, f"cannot start a worker: {exc}")

    def _on_ready(self, worker: WorkerProcess) -> None:
        if self.stopping:
            return
        self.state = "READY"
        self.reason = ""
        self.metrics.ready.set(1)
        self.batcher.add_worker(worker)
        self._settled.set()

    def _on_load_error(self, worker: WorkerProcess, message: str) -> None:
        log.error("model failed to load", extra={"model": self.name, "version": self.version, "error": message})
        self.state = "UNAVAILABLE"
        self.reason = message
        self.stopping = True  # deterministic failure: do not restart
        self.metrics.ready.set(0)
        self._settled.set()
        for other in list(self.workers.values()):
            other.kill()

    def _on_stuck(self, worker: Any) -> None:
        log.error("worker stuck on a batch past every deadline; killing it",
                  extra={"model": self.name, "version": self.version, "pid": worker.pid})
        worker.kill()

    def _on_exit(self, worker: WorkerProcess, exitcode: int | None) -> None:
        self.batcher.remove_worker(worker)
        self.workers.pop(worker.id, None)
        slot = self._slot_of.pop(worker.id)
        if self.batcher.live_workers == 0 and not self.superseded:
            self.metrics.ready.set(0)
        if self.stopping:
            return
        lived = time.monotonic() - worker.started_at
        if lived >= _STABLE_AFTER_S:
            self._backoff.pop(slot, None)
        self._schedule_restart(slot, f"worker exited with code {exitcode}")

    def _schedule_restart(self, slot: tuple[str, int], why: str) -> None:
        delay = self._backoff.get(slot, _BACKOFF_START_S / 2) * 2
        delay = min(delay, _BACKOFF_MAX_S)
        self._backoff[slot] = delay
        log.warning("restarting worker", extra={"model": self.name, "version": self.version,
                                                "delay_s": delay, "reason": why})

        async def restart() -> None:
            await asyncio.sleep(delay)
            if not self.stopping:
                self._spawn(slot)

        task = asyncio.get_running_loop().create_task(restart())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def wait_settled(self, timeout_s: float) -> bool:
        """Wait until the first worker is ready (True) or loading failed / timed out (False)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        return self.state == "READY"

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting, let queued and running requests finish (bounded), then stop the workers."""
        if self.state != "UNAVAILABLE":
            self.state = "UNLOADING"
        await self.batcher.drain(drain_timeout_s)
        self.stopping = True
        self.batcher.close(f"model '{self.name}' version {self.version} is being unloaded")
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*(w.stop() for w in list(self.workers.values())), return_exceptions=True)
        if not self.superseded:
            self.metrics.ready.set(0)
        self._settled.set()


class ModelManager:
    """The served model versions of the whole server, reconciled with the registry."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices = resolve_devices(settings.devices)
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self._latest: dict[str, list[ModelVersion]] = {}  # versions, highest first
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()
        self.load_errors: dict[tuple[str, int], str] = {}  # versions that could not be fetched or read
        self.started = False

    def registry(self) -> Any:
        """A fresh registry view (so that load sees what was published since)."""
        return Registry(self.settings.model_repository, cache_dir=self.settings.cache_dir,
                        storage_options=self.settings.storage_options or None)

    # ---------------------------------------------------------------- lookups (hot path)
    def resolve(self, name: str, version: str | None) -> ModelVersion:
        """The served version to use: the one named, or the highest ready (else highest) version."""
        if version is None:
            versions = self._latest.get(name)
            if not versions:
                raise NotFound(f"model '{name}' is not served")
            for mv in versions:
                if mv.ready:
                    return mv
            return versions[0]
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"model '{name}' is not served")
        try:
            mv = served.get(int(version))
        except ValueError:
            mv = None
        if mv is None:
            raise NotFound(f"model '{name}' has no served version '{version}'")
        return mv

    def is_ready(self) -> bool:
        """Every model version that should be served is loaded and warmed up."""
        return self.started and all(mv.ready for versions in self.models.values() for mv in versions.values())

    def _publish(self, name: str, versions: dict[int, ModelVersion] | None) -> None:
        if versions:
            self.models[name] = versions
            self._latest[name] = [versions[v] for v in sorted(versions, reverse=True)]
        else:
            self.models.pop(name, None)
            self._latest.pop(name, None)

    # ---------------------------------------------------------------- load / unload
    async def open(self) -> list[str]:
        """List the registry's models; raises (failing the server's startup) when the registry is unreadable."""
        return await asyncio.to_thread(lambda: self.registry().model_names())

    async def start(self, names: list[str]) -> None:
        """Load the given models (without waiting for warm-up; readiness reports progress)."""
        for name in names:
            try:
                await self.load(name, wait=False)
            except (LoadError, NotFound) as exc:
                log.error("model not loaded", extra={"model": name, "error": str(exc)})
        self.started = True

    async def load(self, name: str, *, wait: bool = True) -> list[ModelVersion]:
        """(Re)load a model from the registry: start new or changed versions, retire the others.

        With ``wait``, returns once the new versions are warm (raising LoadError if one failed), and only then
        routes requests to them.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            def read() -> tuple[Any, list[tuple[int, Path]], dict[int, str]]:
                registry = self.registry()
                if name not in registry.model_names():
                    raise NotFound(f"model '{name}' is not in the repository")
                config = registry.config(name)
                paths, errors = [], {}
                for v in registry.served_versions(name):
                    try:  # a bad version fails alone
                        paths.append((v, Path(registry.fetch(name, v))))
                    except (RegistryError, OSError) as exc:
                        errors[v] = str(exc)
                return config, paths, errors

            try:
                config, paths, errors = await asyncio.to_thread(read)
            except RegistryError as exc:
                raise LoadError(f"model '{name}': {exc}") from exc
            current = self.models.get(name, {})
            keep: dict[int, ModelVersion] = {}
            fresh: list[ModelVersion] = []
            for version, path in paths:
                old = current.get(version)
                try:
                    sha = read_signature(path)[2].get("weights_sha256")
                    if (old is not None and old.state not in ("UNAVAILABLE", "UNLOADING") and old.config == config
                            and old.weights_sha256 == sha):
                        keep[version] = old
                        continue
                    mv = ModelVersion(name, version, path, config, self.settings, self.metrics, self.devices)
                except LoadError as exc:
                    errors[version] = str(exc)
                    continue
                fresh.append(mv)
                keep[version] = mv
            for version, message in errors.items():
                log.error("model version not loaded", extra={"model": name, "version": version, "error": message})
            self.load_errors = {k: v for k, v in self.load_errors.items() if k[0] != name}
            self.load_errors.update({(name, v): message for v, message in errors.items()})
            if not keep:
                raise LoadError(f"model '{name}' has no version to serve"
                                + "".join(f"; version {v}: {m}" for v, m in errors.items()))
            for mv in fresh:
                mv.start()
            if wait:
                await asyncio.gather(*(mv.wait_settled(self.settings.worker_start_timeout_s) for mv in fresh))
                for mv in fresh:  # a failed reload keeps serving the old, working copy of that version
                    old = current.get(mv.version)
                    if not mv.ready and old is not None and old.ready:
                        keep[mv.version] = old
                        mv.superseded = True
                        self._retire(mv)
                        old.metrics.ready.set(1)
            self._publish(name, keep)
            for version, old in current.items():
                if keep.get(version) is not old:
                    old.superseded = version in keep
                    self._retire(old)
            failed = [mv for mv in fresh if mv.state == "UNAVAILABLE" or (wait and not mv.ready)]
            if wait and failed:
                raise LoadError("; ".join(
                    f"model '{mv.name}' version {mv.version} failed to load: {mv.reason or 'timed out'}"
                    for mv in failed
                ))
            return list(keep.values())

    def _retire(self, mv: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(mv.stop(self.settings.drain_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        """Stop serving a model: new requests get 404, queued and running ones finish, workers stop."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self.models.get(name)
            if current is None:
                known = await asyncio.to_thread(lambda: name in self.registry().model_names())
                if not known:
                    raise NotFound(f"model '{name}' is not in the repository")
                return
            self._publish(name, None)
            await asyncio.gather(*(mv.stop(self.settings.drain_timeout_s) for mv in current.values()))

    async def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index: every version in the registry and every served one, with its state."""
        entries: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            states = await asyncio.to_thread(lambda: self.registry().index())
        except Exception as exc:
            log.error("cannot index the model repository", extra={"error": str(exc)})
            states = []
        for st in states:
            reason = st.reason if st.state != "AVAILABLE" else self.load_errors.get((st.name, st.version),
                                                                                    "not loaded")
            entries[(st.name, st.version)] = {"name": st.name, "version": str(st.version),
                                              "state": "UNAVAILABLE", "reason": reason}
        for name, versions in self.models.items():
            for version, mv in versions.items():
                entries[(name, version)] = mv.status()
        result = [entries[key] for key in sorted(entries)]
        if ready_only:
            result = [e for e in result if e["state"] == "READY"]
        return result

    async def close(self) -> None:
        """Stop every worker (after the HTTP server has drained its requests)."""
        versions = [mv for vs in self.models.values() for mv in vs.values()]
        self.models.clear()
        self._latest.clear()
        await asyncio.gather(*(mv.stop(0) for mv in versions), return_exceptions=True)
        await asyncio.gather(*list(self._retiring), return_exceptions=True)
