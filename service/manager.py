"""Which model versions are served: loading from the registry, worker pools, restarts, readiness, unloading.

A :class:`ModelVersion` owns a :class:`~service.batching.Batcher` and ``instances`` worker processes per device,
supervised per slot: a worker that dies is restarted alone with exponential backoff (its batch is retried once
elsewhere or failed with 503), and a version that cannot start is failed with a reason instead of restarting forever.
:class:`ModelManager` maps model names to their served versions and reconciles them with the registry on ``load``
and, with ``repository_poll_s``, by polling; swapping versions happens only once the new ones are warm, so loading or
unloading one model never drops requests to another. It also owns the readiness policy and the state metrics.
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

from capsa.manifest import (
    DATATYPE_NAMES,
    MANIFEST_FILE,
    SERVED_DATATYPES,
    BundleError,
    TensorSpec,
    check_bundle,
    narrow_allowed,
    parse_manifest,
)
from service.batching import Batcher
from service.calibrated import ServedCalibration
from service.components import component_names
from service.metrics import VERSION_STATES, Metrics, VersionMetrics
from service.model_config import ConfigError, available_cores, worker_torch_threads
from service.protocol import DATATYPES
from service.registry import Registry, RegistryError
from service.settings import Settings, parse_devices
from service.workers import WorkerProcess, WorkerSpec

log = logging.getLogger("capsa.serve.manager")

_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 30.0
_STABLE_AFTER_S = 30.0  # a worker that lived this long resets its slot's backoff
_MAX_START_ATTEMPTS = 3  # workers of one slot that die while loading before a new version counts as failed


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


def read_signature(path: Path) -> tuple[TensorSpec, TensorSpec, dict[str, Any]]:
    """The input and ``prediction`` specs of a bundle and its capsa.json as a dict, read through
    `capsa.manifest.parse_manifest` (no model code is imported); `LoadError` when capsa-serve cannot serve it."""
    try:
        manifest = parse_manifest((path / MANIFEST_FILE).read_bytes(), source=str(path))
    except OSError as exc:
        raise LoadError(f"{path}: cannot read {MANIFEST_FILE}: {exc}") from exc
    except BundleError as exc:
        raise LoadError(str(exc)) from None
    if len(manifest.inputs) != 1:
        raise LoadError(f"{path}: capsa models take exactly one input, capsa.json lists {len(manifest.inputs)}")
    unserved = [f"{kind} '{t.name}' is {t.datatype}"
                for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs))
                for t in specs if t.datatype not in SERVED_DATATYPES]
    if unserved:
        servable = [n for n in DATATYPE_NAMES if n in SERVED_DATATYPES]
        raise LoadError(f"{path}: {'; '.join(unserved)}, which capsa-serve does not serve (it serves "
                        f"{', '.join(servable)}); save the bundle with a model in one of those")
    if not manifest.inputs[0].shape:
        raise LoadError(f"{path}: the input has no batch dimension")
    outputs = {t.name: t for t in manifest.outputs}
    prediction = outputs.get("prediction") or manifest.outputs[0]
    return manifest.inputs[0], prediction, manifest.model_dump()


class ModelVersion:
    """One served model version: its signature, config, batcher and worker processes.

    Supervision is per slot (one slot = one worker on one device): a slot whose worker dies or fails to start is
    restarted alone, with exponential backoff, while the other slots keep serving. A version that never served
    fails (``UNAVAILABLE``, with the reason) at its first load error or after ``_MAX_START_ATTEMPTS`` workers of a
    slot died while loading (a crash loop); a version that has served keeps retrying its failed slots, so it comes
    back on its own once the cause (say, a weights file briefly absent) is gone. A start past
    ``worker_start_timeout_s`` counts as a load error.
    """

    def __init__(self, name: str, version: int, path: Path, config: Any, settings: Settings,
                 metrics: Metrics, devices: list[str]) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.path = path
        self.config = config
        self.settings = settings
        self.input, self.prediction, self.meta = read_signature(path)
        #: the risk components this version serves (``risk_aleatoric``, ...; empty for a single wrapper), derived
        #: once from capsa.json rather than per request
        self.components: tuple[str, ...] = component_names(self.meta)
        self.max_batch_size = int(config.max_batch_size)
        self.allow_non_finite = bool(config.allow_non_finite)
        self.risk_threshold: float | None = config.risk_threshold
        try:  # a calibrated bundle serves risk percentiles and intervals or sets too (service.calibrated)
            self.calibration = ServedCalibration.load(path, self.meta)
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        self.risk_percentile_threshold: float | None = getattr(config, "risk_percentile_threshold", None)
        if self.risk_percentile_threshold is not None and self.calibration is None:
            raise LoadError(f"{path}: config.json sets risk_percentile_threshold, but this version is not "
                            "calibrated (capsa calibrate)")
        self.metrics: VersionMetrics = metrics.for_version(name, version)
        if self.calibration is not None:
            labels = (name, str(version))
            self.calibration.bind_metrics(metrics.risk_percentile.labels(*labels),
                                          metrics.risk_drift.labels(*labels), settings.drift_window)
        self.batcher = Batcher(
            max_batch_size=self.max_batch_size,
            max_batch_delay_s=float(config.max_batch_delay_ms) / 1000.0,
            max_queue_size=int(config.max_queue_size),
            timeout_s=settings.request_timeout_s,
            metrics=self.metrics,
            on_stuck=self._on_stuck,
            busy_poll_s=settings.busy_poll_us / 1e6,
        )
        instances = settings.workers_per_device or int(config.instances)
        self.slots = [(device, i) for device in devices for i in range(instances)]
        cpu_workers = sum(1 for device, _ in self.slots if device == "cpu")
        # every HTTP front end beyond the first takes a core too (CAPSA_HTTP_PROCESSES, service.frontends)
        cores = max(1, available_cores() - settings.http_processes + 1)
        self.torch_threads = worker_torch_threads(config.torch_threads, settings.torch_threads, cpu_workers, cores)
        self.workers: dict[int, WorkerProcess] = {}
        self._slot_of: dict[int, tuple[str, int]] = {}
        self._backoff: dict[tuple[str, int], float] = {}
        self._failures: dict[tuple[str, int], int] = {}  # consecutive failed starts per slot
        self._stuck: set[tuple[str, int]] = set()  # slots whose worker was declared stuck and not yet replaced
        self._worker_errors: dict[int, str] = {}  # worker id -> the load error it reported
        self._ready_ids: set[int] = set()
        self._restarts: set[asyncio.Task[None]] = set()
        self.state = "LOADING"  # LOADING | READY | UNAVAILABLE (failed) | UNLOADING
        self.reason = ""
        self.problem = ""  # a later load found this version's files broken; the loaded copy keeps serving
        self.served = False  # some worker of this version became ready once
        self.stopping = False
        self.superseded = False  # replaced by a reload of the same version: leave the shared gauge alone
        self._settled = asyncio.Event()

    # ---------------------------------------------------------------- status
    @property
    def ready(self) -> bool:
        """Loaded, warmed up and with at least one live worker."""
        return self.state == "READY" and self.batcher.live_workers > 0

    @property
    def stuck(self) -> bool:
        """A worker was declared stuck and its slot has no ready replacement yet."""
        return bool(self._stuck)

    @property
    def weights_sha256(self) -> str | None:
        """The bundle's weights checksum (to tell whether a reload changed the model)."""
        return self.meta.get("weights_sha256")

    def status(self) -> dict[str, Any]:
        """State for the repository index (detailed reasons: the index needs the admin token)."""
        state = "READY" if self.ready else ("LOADING" if self.state == "READY" else self.state)
        reason = self.reason
        if self.stuck:
            reason = "a worker was stuck on a batch; it is being replaced"
        elif self.problem:
            reason = f"serving the copy loaded before; the repository's files fail: {self.problem}"
        return {"name": self.name, "version": self.version_str, "state": state, "reason": reason}

    def health(self) -> tuple[str, str | None]:
        """(state for readiness, generic reason or None when serving normally).

        States: ``ready``, ``failed`` (settled: failed with a reason), ``loading`` and ``stuck`` (not settled).
        Reasons are generic, for unauthenticated clients; the details are in the log and the repository index.
        """
        if self.stuck:
            return "stuck", "a worker is stuck; replacing it"
        if self.ready:
            return "ready", None
        if self.state == "UNAVAILABLE":
            return "failed", "failed to load"
        if self.state == "LOADING":
            return "loading", "loading"
        return "loading", "restarting workers"

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
            # the operator's CAPSA_ALLOWED_MODULES narrowed by config.json: the worker refuses anything else
            allowed_modules=tuple(narrow_allowed(self.settings.allowed_module_list(), self.config.allowed_modules)
                                  or ()),
            torch_threads=self.torch_threads,
            interop_threads=self.config.interop_threads,
            warmup_batch=min(self.max_batch_size, 8),
            busy_poll_s=self.settings.busy_poll_us / 1e6,
        )
        worker = WorkerProcess(
            spec, name=f"{self.name}-{self.version}-{device}-{slot[1]}", on_ready=self._on_ready,
            on_load_error=self._on_load_error, on_result=self.batcher.complete, on_exit=self._on_exit,
        )
        self.workers[worker.id] = worker
        self._slot_of[worker.id] = slot
        try:
            worker.start(self.settings.worker_start_timeout_s)
        except Exception as exc:  # e.g. cannot spawn: a failed start of this slot
            log.error("cannot start worker", extra={"model": self.name, "version": self.version,
                                                    "error": f"{type(exc).__name__}: {exc}"})
            self.workers.pop(worker.id, None)
            self._slot_of.pop(worker.id, None)
            self._start_failed(slot, f"cannot start a worker: {exc}", load_error=False)

    def _on_ready(self, worker: WorkerProcess) -> None:
        if self.stopping:
            return
        slot = self._slot_of.get(worker.id)
        if slot is not None:
            self._failures.pop(slot, None)
            self._stuck.discard(slot)
        self._ready_ids.add(worker.id)
        self.served = True
        self.state = "READY"
        self.reason = ""
        self.metrics.ready.set(1)
        self.batcher.add_worker(worker)
        self._settled.set()

    def _on_load_error(self, worker: WorkerProcess, message: str) -> None:
        """The worker reported why it cannot load; its exit (``_on_exit``) decides what happens to the slot."""
        log.error("worker failed to load the model", extra={"model": self.name, "version": self.version,
                                                            "worker": worker.name, "error": message})
        self._worker_errors[worker.id] = message
        worker.kill()

    def _on_stuck(self, worker: Any) -> None:
        """A worker stopped answering: readiness says so until its slot has a ready replacement."""
        slot = self._slot_of.get(worker.id)
        if slot is not None and not self.stopping:
            self._stuck.add(slot)
        log.error("worker stuck on a batch; killing it",
                  extra={"model": self.name, "version": self.version, "pid": worker.pid})
        worker.kill()

    def _on_exit(self, worker: WorkerProcess, exitcode: int | None) -> None:
        self.batcher.remove_worker(worker)
        self.workers.pop(worker.id, None)
        slot = self._slot_of.pop(worker.id, None)
        error = self._worker_errors.pop(worker.id, None)
        was_ready = worker.id in self._ready_ids
        self._ready_ids.discard(worker.id)
        if self.batcher.live_workers == 0 and not self.superseded:
            self.metrics.ready.set(0)
        if self.stopping or slot is None:
            return
        lived = time.monotonic() - worker.started_at
        if was_ready:
            if lived >= _STABLE_AFTER_S:
                self._backoff.pop(slot, None)
            self._schedule_restart(slot, f"worker exited with code {exitcode}")
            return
        if error is not None:  # the worker said why: the bundle does not load
            self._start_failed(slot, error, load_error=True)
            return
        timeout = self.settings.worker_start_timeout_s
        if lived >= timeout:  # the operator's bound on a load: like a load error, not a crash to retry
            self._start_failed(slot, f"the worker did not become ready within {timeout:g}s", load_error=True)
            return
        self._start_failed(slot, f"the worker exited with code {exitcode} while loading", load_error=False)

    def _start_failed(self, slot: tuple[str, int], why: str, *, load_error: bool) -> None:
        """A worker of ``slot`` failed before it was ready: fail the version or retry the slot."""
        failures = self._failures[slot] = self._failures.get(slot, 0) + 1
        if self.batcher.live_workers == 0 and (failures >= _MAX_START_ATTEMPTS or (load_error and not self.served)):
            if not self.served:
                self._fail(why if failures == 1 else f"{why} ({failures} attempts)")
                return
            if self.state != "UNAVAILABLE":  # it served before: report it, keep retrying (the cause may pass)
                log.error("model version has no worker left; still retrying",
                          extra={"model": self.name, "version": self.version, "error": why})
            self.state = "UNAVAILABLE"
            self.reason = why
            self._settled.set()
        self._schedule_restart(slot, why)

    def _fail(self, why: str) -> None:
        """Loading failed for good: stop every worker of this version and report why."""
        log.error("model failed to load", extra={"model": self.name, "version": self.version, "error": why})
        self.state = "UNAVAILABLE"
        self.reason = why
        self.stopping = True
        self.metrics.ready.set(0)
        self._settled.set()
        for task in list(self._restarts):
            task.cancel()
        for other in list(self.workers.values()):
            other.kill()

    def _schedule_restart(self, slot: tuple[str, int], why: str) -> None:
        delay = self._backoff.get(slot, _BACKOFF_START_S / 2) * 2
        delay = min(delay, _BACKOFF_MAX_S)
        self._backoff[slot] = delay
        log.warning("restarting worker", extra={"model": self.name, "version": self.version,
                                                "slot": f"{slot[0]}-{slot[1]}", "delay_s": delay, "reason": why})

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

    async def stop(self, drain_timeout_s: float, *, grace_s: float = 0.0) -> None:
        """Stop accepting (after ``grace_s``), let queued and running requests finish (bounded), stop the workers."""
        if grace_s > 0:
            await asyncio.sleep(grace_s)
        if self.state != "UNAVAILABLE":
            self.state = "UNLOADING"
        self.stopping = True  # no restart from here on (also cancels a load still in progress)
        for task in list(self._restarts):
            task.cancel()
        self._settled.set()
        await self.batcher.drain(drain_timeout_s)
        self.batcher.close(f"model '{self.name}' version {self.version} is being unloaded")
        await asyncio.gather(*(w.stop() for w in list(self.workers.values())), return_exceptions=True)
        if not self.superseded:
            self.metrics.ready.set(0)
        self._stuck.clear()


class LoadCancelled(LoadError):
    """A load was cancelled by an unload or replaced by a newer load of the same model (409)."""


@dataclass(frozen=True)
class VersionHealth:
    """One model version that should be served, as readiness and the state metrics see it."""

    name: str
    version: int  # 0: the model as a whole (no version could be read)
    state: str  # ready | loading | stuck | failed
    reason: str | None  # generic (safe for unauthenticated clients); None while serving normally


class ModelManager:
    """The served model versions of the whole server, reconciled with the registry (on load, or by polling)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices = resolve_devices(settings.devices)
        self.models: dict[str, dict[int, ModelVersion]] = {}
        self._latest: dict[str, list[ModelVersion]] = {}  # versions, highest first
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: dict[asyncio.Task[None], ModelVersion] = {}
        self._pending: dict[str, tuple[object, list[ModelVersion]]] = {}  # loads waiting for warm-up
        self.load_errors: dict[tuple[str, int], str] = {}  # versions that could not be fetched, read or loaded
        self.model_errors: dict[str, str] = {}  # models that should be served but have no version to serve
        self._fingerprints: dict[str, str] = {}  # what the registry held when each model was last (un)loaded
        self._unloaded: set[str] = set()  # unloaded through the API: polling leaves them alone until they change
        self._poller: asyncio.Task[None] | None = None
        self._warned_empty = False
        self.started = False
        metrics.before_render(self._export_states)

    def registry(self) -> Registry:
        """A fresh registry view (so that load sees what was published since)."""
        return Registry(self.settings.model_repository, cache_dir=self.settings.cache_dir,
                        storage_options=self.settings.storage_options or None,
                        allowed_modules=self.settings.allowed_module_list())

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
            found = served.get(int(version))
        except ValueError:
            found = None
        if found is None:
            raise NotFound(f"model '{name}' has no served version '{version}'")
        return found

    # ---------------------------------------------------------------- readiness
    def health(self) -> list[VersionHealth]:
        """Every model version that should be served (published, or failed before it could be), with its state."""
        result: list[VersionHealth] = []
        for name, versions in self.models.items():
            for version, mv in versions.items():
                state, reason = mv.health()
                result.append(VersionHealth(name, version, state, reason))
        for (name, version), _ in self.load_errors.items():
            if version not in self.models.get(name, {}):
                result.append(VersionHealth(name, version, "failed", "failed to load"))
        for name in self.model_errors:
            if name not in self.models:
                result.append(VersionHealth(name, 0, "failed", "failed to load"))
        return sorted(result, key=lambda h: (h.name, h.version))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the answer of ``/v2/health/ready``) under the readiness policy.

        Default: ready once every version that should be served has settled (loaded, or failed with a reason) and
        at least one serves; a stuck worker makes it not ready until replaced. ``strict_readiness`` (Triton's):
        ready only when every version is loaded. The answer names each model version not ready, with a generic
        reason.
        """
        versions = self.health()
        problems = [{"name": h.name, "version": str(h.version), "reason": h.reason}
                    for h in versions if h.reason is not None]
        serving = any(h.state == "ready" for h in versions)
        if self.settings.strict_readiness:
            ok = all(h.state == "ready" for h in versions)
        else:
            ok = all(h.state in ("ready", "failed") for h in versions)
        answer: dict[str, Any] = {"ready": False}
        if not self.started:
            answer["reason"] = "loading the model repository"
        elif not versions:
            answer["reason"] = "no model in the repository"
        elif not serving:
            answer["reason"] = "no model is ready"
        else:
            answer["ready"] = ok
        if problems:
            answer["models"] = problems
        return answer["ready"], answer

    def is_ready(self) -> bool:
        """Whether the server is ready under the readiness policy (see :meth:`readiness`)."""
        return self.readiness()[0]

    def _export_states(self) -> None:
        """Set the state gauges (called at scrape time)."""
        counts = dict.fromkeys(VERSION_STATES, 0)
        failed: list[tuple[str, str]] = []
        loaded: list[tuple[str, str]] = []
        for h in self.health():
            counts["loading" if h.state == "stuck" else h.state] += 1
            labels = (h.name, str(h.version))
            if h.state == "failed":
                failed.append(labels)
                if h.version not in self.models.get(h.name, {}):
                    self.metrics.ready.labels(*labels).set(0)
            else:
                loaded.append(labels)
        for _, fresh in self._pending.values():
            counts["loading"] += sum(1 for mv in fresh if not mv.ready and mv.state != "UNAVAILABLE")
        failed += [(name, str(v)) for (name, v) in self.load_errors if v in self.models.get(name, {})]
        self.metrics.set_version_states(counts, failed, loaded)

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
        """Load the given models (without waiting for warm-up; readiness reports progress), then start polling."""
        if not names:
            log.warning("no model in the model repository: the server is not ready until one is loaded",
                        extra={"root": self.settings.model_repository})
            self._warned_empty = True
        prints: dict[str, str] = {}
        if self.settings.repository_poll_s:  # what is loaded now, so the first poll reloads nothing unchanged
            with contextlib.suppress(Exception):
                prints = await self._read_fingerprints()
        for name in names:
            if name in prints:
                self._fingerprints[name] = prints[name]
            with contextlib.suppress(LoadError, NotFound):  # logged by load, reported by readiness and the index
                await self.load(name, wait=False)
        self.started = True
        if self.settings.repository_poll_s:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(self.settings.repository_poll_s))

    def _settle_timeout_s(self) -> float:
        """An upper bound on how long a new version takes to settle (it fails itself sooner: see ModelVersion)."""
        return _MAX_START_ATTEMPTS * (self.settings.worker_start_timeout_s + _BACKOFF_MAX_S)

    def _read(self, name: str) -> tuple[Any, list[tuple[int, Path]], dict[int, str]]:
        """(config, [(version, local path)], {version: error}) of a model, in a thread (fetches, checksums)."""
        registry = self.registry()
        if name not in registry.model_names():
            raise NotFound(f"model '{name}' is not in the repository")
        config = registry.config(name)
        paths, errors = [], {}
        for v in registry.served_versions(name):
            try:  # a bad version fails alone; every file a worker (re)start needs is checked, weights included
                problem = registry.architecture_problem(name, v, config)  # before anything is fetched or run
                if problem:
                    errors[v] = problem
                    continue
                path = Path(registry.fetch(name, v))
                check_bundle(path)
                paths.append((v, path))
            except (RegistryError, BundleError, OSError) as exc:
                errors[v] = str(exc)
        return config, paths, errors

    async def load(self, name: str, *, wait: bool = True) -> list[ModelVersion]:
        """(Re)load a model from the registry: start new or changed versions, retire the others.

        With ``wait``, returns once the new versions are warm (raising LoadError if one failed), and only then
        routes requests to them; the model's lock is not held meanwhile, so an unload cancels a pending load.
        A version whose new files or config fail keeps serving the copy loaded before (the problem is reported),
        and a new version that fails leaves the versions serving now in place.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self.models.get(name, {})
            try:
                config, paths, errors = await asyncio.to_thread(self._read, name)
            except (RegistryError, ConfigError) as exc:
                message = str(exc) if isinstance(exc, ConfigError) else f"model '{name}': {exc}"
                log.error("model not loaded", extra={"model": name, "error": message})
                if current:
                    for mv in current.values():
                        mv.problem = message
                else:
                    self.model_errors[name] = message
                raise LoadError(message) from None
            keep: dict[int, ModelVersion] = {}
            fresh: list[ModelVersion] = []
            for version, path in paths:
                old = current.get(version)
                try:
                    sha = read_signature(path)[2].get("weights_sha256")
                    if (old is not None and old.state not in ("UNAVAILABLE", "UNLOADING") and old.config == config
                            and old.weights_sha256 == sha):
                        keep[version] = old
                        old.problem = ""
                        continue
                    mv = ModelVersion(name, version, path, config, self.settings, self.metrics, self.devices)
                except LoadError as exc:
                    errors[version] = str(exc)
                    continue
                fresh.append(mv)
                keep[version] = mv
            for version, message in errors.items():
                log.error("model version not loaded", extra={"model": name, "version": version, "error": message})
                old = current.get(version)
                if old is not None and old.state not in ("UNAVAILABLE", "UNLOADING"):
                    old.problem = message  # keeps serving what it loaded; a restart would fail: say so
                    keep[version] = old
            self.load_errors = {k: v for k, v in self.load_errors.items() if k[0] != name}
            self.load_errors.update({(name, v): message for v, message in errors.items()})
            if not keep:
                message = (f"model '{name}' has no version to serve"
                           + "".join(f"; version {v}: {m}" for v, m in errors.items()))
                if not current:
                    self.model_errors[name] = message
                    log.error("model not loaded", extra={"model": name, "error": message})
                raise LoadError(message)
            self.model_errors.pop(name, None)
            self._unloaded.discard(name)
            previous = self._pending.pop(name, None)
            if previous is not None:  # a newer load replaces one still warming up
                for mv in previous[1]:
                    self._retire(mv)
            for mv in fresh:
                mv.start()
            if not wait:
                self._swap(name, keep, fresh, errors, wait=False)
                return list(keep.values())
            token = object()
            self._pending[name] = (token, fresh)
        await asyncio.gather(*(mv.wait_settled(self._settle_timeout_s()) for mv in fresh))
        async with lock:
            if self._pending.get(name, (None,))[0] is not token:
                for mv in fresh:
                    if not mv.stopping:
                        self._retire(mv)
                raise LoadCancelled(f"loading model '{name}' was cancelled by an unload or a newer load")
            del self._pending[name]
            return self._swap(name, keep, fresh, errors, wait=True)

    def _swap(self, name: str, keep: dict[int, ModelVersion], fresh: list[ModelVersion], errors: dict[int, str],
              *, wait: bool) -> list[ModelVersion]:
        """Route requests to ``keep`` and retire what it replaces (with ``wait``, raise LoadError on failures)."""
        current = self.models.get(name, {})
        failed = [mv for mv in fresh if mv.state == "UNAVAILABLE" or (wait and not mv.ready)]
        for mv in failed:  # a failed reload keeps serving the old, working copy of that version
            old = current.get(mv.version)
            if wait and old is not None and old.ready:
                keep[mv.version] = old
                old.problem = mv.reason or "timed out"
                mv.superseded = True
                self._retire(mv)
                old.metrics.ready.set(1)
        if wait and (failed or errors):  # a failed new version leaves the versions serving now in place
            for version, old in current.items():
                if version not in keep and old.ready:
                    keep[version] = old
        self._publish(name, keep)
        for version, old in current.items():
            if keep.get(version) is not old:
                old.superseded = version in keep
                self._retire(old, was_served=True)
        if wait and failed:
            for mv in failed:
                self.load_errors[(name, mv.version)] = mv.reason or "timed out"
            raise LoadError("; ".join(
                f"model '{mv.name}' version {mv.version} failed to load: {mv.reason or 'timed out'}"
                for mv in failed
            ))
        if wait and errors:
            raise LoadError("; ".join(f"model '{name}' version {v}: {m}" for v, m in errors.items()))
        return list(keep.values())

    def _retire(self, mv: ModelVersion, *, was_served: bool = False) -> None:
        """Stop ``mv`` in the background. One that was routed to keeps taking requests for the body timeout first:
        a request resolved to it just before the swap may still be reading its body, and must not get a 503."""
        grace = self.settings.body_timeout_s if was_served else 0.0
        task = asyncio.get_running_loop().create_task(mv.stop(self.settings.drain_timeout_s, grace_s=grace))
        self._retiring[task] = mv
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def unload(self, name: str, *, polled: bool = False) -> None:
        """Stop serving a model: a pending load is cancelled, new requests get 404, queued and running ones
        finish, workers stop. Polling does not load it again until it changes in the registry."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            pending = self._pending.pop(name, None)
            stopping = list(pending[1]) if pending is not None else []
            current = self.models.get(name)
            failed = name in self.model_errors or any(k[0] == name for k in self.load_errors)
            self.model_errors.pop(name, None)
            self.load_errors = {k: v for k, v in self.load_errors.items() if k[0] != name}
            if not polled:
                self._unloaded.add(name)
            if current is None and pending is None and not failed and not polled:
                known = await asyncio.to_thread(lambda: name in self.registry().model_names())
                if not known:
                    raise NotFound(f"model '{name}' is not in the repository")
            if current is not None:
                self._publish(name, None)
                stopping += current.values()
            await asyncio.gather(*(mv.stop(self.settings.drain_timeout_s) for mv in stopping))

    # ---------------------------------------------------------------- polling
    async def _read_fingerprints(self) -> dict[str, str]:
        def read() -> dict[str, str]:
            registry = self.registry()
            return {name: registry.fingerprint(name) for name in registry.model_names()}

        return await asyncio.to_thread(read)

    async def poll(self) -> None:
        """Reconcile once with the registry: load new and changed models (warm before they take traffic), unload
        the removed ones (after their requests finish). Unchanged models, and failed ones, are left alone."""
        prints = await self._read_fingerprints()
        if not prints:  # logged once; with models loaded, more likely an outage than every model removed at once
            if not self._warned_empty:
                log.warning("no model in the model repository" + ("; keeping the loaded ones" if self.models else ""),
                            extra={"root": self.settings.model_repository})
            self._warned_empty = True
            return
        self._warned_empty = False
        for name, fingerprint in prints.items():
            if self._fingerprints.get(name) == fingerprint:
                continue
            self._fingerprints[name] = fingerprint
            log.info("model changed in the repository; loading it", extra={"model": name})
            try:
                await self.load(name)
            except (LoadError, NotFound):
                continue  # logged by load; reported by readiness, the metrics and the index
            log.info("model loaded from the repository", extra={"model": name})
        gone = (set(self.models) | set(self.model_errors) | {k[0] for k in self.load_errors}) - set(prints)
        for name in sorted(gone):
            log.info("model removed from the repository; unloading it", extra={"model": name})
            self._fingerprints.pop(name, None)
            await self.unload(name, polled=True)

    async def _poll_forever(self, interval_s: float) -> None:
        failing = ""  # the last polling error, logged once (not every interval) until polling works again
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception as exc:  # a registry outage: keep serving what is loaded, try again later
                error = f"{type(exc).__name__}: {exc}"
                if error != failing:
                    log.error("polling the model repository failed; serving what is loaded",
                              extra={"error": error})
                failing = error
            else:
                if failing:
                    log.info("polling the model repository works again")
                failing = ""

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
        """Stop polling and every worker (after the HTTP server has drained its requests)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        versions = [mv for vs in self.models.values() for mv in vs.values()]
        versions += [mv for _, fresh in self._pending.values() for mv in fresh]
        retiring = dict(self._retiring)
        for task in retiring:  # no grace at shutdown: the HTTP server has answered its requests already
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        versions += retiring.values()
        self._pending.clear()
        self.models.clear()
        self._latest.clear()
        await asyncio.gather(*(mv.stop(0) for mv in versions), return_exceptions=True)
