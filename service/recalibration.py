"""The service's calibrators: which one is active for each (model, method, mode, task), applying it
to a raw score, loading calibrator files, and refitting from /feedback labels off the
request path.

The fitting math is ``service.calibration.recalibrate`` (pure); this module only wires it to
the store, the clock and the metrics. The active map is replaced as a whole (one reference
assignment on the event loop), so a request sees either the old or the new version, never a
mix; it can be re-read from the store (``refresh``) so that replicas sharing a store pick up
a version another replica promoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.calibration import recalibrate
from service.calibration.recalibrate import (
    Calibrator,
    CalibratorError,
    FitPolicy,
    FitResult,
    RefitDecision,
)
from service.logs import Stream, log_json_lines
from service.store import (
    DEFAULT_TASK,
    TASKS,
    CalibratorKey,
    CalibratorRecord,
    FeedbackRecord,
    LabelRow,
    Store,
)
from service.telemetry import Telemetry

__all__ = [
    "FILE_FORMAT",
    "Active",
    "CalibratorFileError",
    "RecalibrationConfig",
    "Recalibrator",
    "load_calibrator_file",
    "load_calibrator_files",
    "record_from_fit",
    "source_id",
    "write_calibrator_file",
]

log = logging.getLogger("ufcal.recalibration")

FILE_FORMAT = "ufcal-calibrators/1"
METHODS = ("uf", "fidelity", "sampled", "token", "verbalized", "linguistic")
MODES = ("logprobs", "sampling")


def source_id(api_key: str) -> str:
    """What the store keeps of the API key that sent a label: a short SHA-256 digest."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Active:
    """An active calibrator: its stored record and the parsed map."""

    record: CalibratorRecord
    calibrator: Calibrator

    @property
    def version(self) -> int:
        return self.record.version


@dataclass(frozen=True)
class RecalibrationConfig:
    """How the service recalibrates (from the settings)."""

    online: bool = False
    every: int = 100
    min_labels: int = 100
    min_class: int = 20
    window: int = 1000
    max_source_share: float = 0.5

    def policy(self) -> FitPolicy:
        return FitPolicy(min_labels=self.min_labels, min_class=self.min_class)


# -- calibrator files ----------------------------------------------------------------------


class CalibratorFileError(ValueError):
    """A calibrator file that cannot be used; the message names the file and the problem."""


def _int(entry: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = entry.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CalibratorError(f"{name!r} must be a non-negative integer, got {value!r}")
    return value


def record_from_json(entry: Any, *, status: str = "active") -> CalibratorRecord:
    """One calibrator of a file (the GET /calibrators shape), validated; an entry without
    ``task`` (files written before free-form questions) is a multiple_choice calibrator."""
    if not isinstance(entry, Mapping):
        raise CalibratorError("each calibrator must be an object")
    for name in ("model", "method", "mode"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise CalibratorError(f"{name!r} must be a non-empty string")
    task = entry.get("task", DEFAULT_TASK)
    if task not in TASKS:
        raise CalibratorError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    if entry["method"] not in METHODS:
        raise CalibratorError(f"unknown method {entry['method']!r}; one of {', '.join(METHODS)}")
    if entry["mode"] not in MODES:
        raise CalibratorError(f"unknown mode {entry['mode']!r}; one of {', '.join(MODES)}")
    calibrator = Calibrator.from_json(entry)
    for name in ("window", "metrics"):
        if not isinstance(entry.get(name, {}), Mapping):
            raise CalibratorError(f"{name!r} must be an object")
    fitted_at = entry.get("fitted_at", 0.0)
    if isinstance(fitted_at, bool) or not isinstance(fitted_at, int | float):
        raise CalibratorError("'fitted_at' must be a number")
    if not math.isfinite(fitted_at):
        raise CalibratorError("'fitted_at' must be finite")
    return CalibratorRecord(
        model=entry["model"],
        method=entry["method"],
        mode=entry["mode"],
        version=_int(entry, "version"),
        kind=calibrator.kind,
        params=dict(calibrator.params),
        labels=_int(entry, "labels"),
        positives=_int(entry, "positives"),
        negatives=_int(entry, "negatives"),
        window=dict(entry.get("window", {})),
        metrics=dict(entry.get("metrics", {})),
        fitted_at=float(fitted_at),
        status=status,
        task=task,
    )


def record_to_json(record: CalibratorRecord) -> dict[str, Any]:
    """A stored calibrator in the shape of GET /calibrators and of calibrator files."""
    return {
        "model": record.model,
        "method": record.method,
        "mode": record.mode,
        "task": record.task,
        "version": record.version,
        "kind": record.kind,
        "params": record.params,
        "labels": record.labels,
        "positives": record.positives,
        "negatives": record.negatives,
        "window": record.window,
        "metrics": record.metrics,
        "fitted_at": record.fitted_at,
        "status": record.status,
    }


def record_from_fit(
    key: CalibratorKey,
    result: FitResult,
    *,
    window: dict[str, Any],
    metrics: dict[str, Any],
    status: str,
    version: int = 0,
) -> CalibratorRecord:
    """A fitted calibrator as a stored version (``version`` 0: the store numbers it)."""
    return CalibratorRecord(
        model=key[0],
        method=key[1],
        mode=key[2],
        task=key[3],
        version=version,
        kind=result.calibrator.kind,
        params=dict(result.calibrator.params),
        labels=result.labels,
        positives=result.positives,
        negatives=result.negatives,
        window=window,
        metrics=metrics,
        fitted_at=time.time(),
        status=status,
    )


def load_calibrator_file(path: Path) -> list[CalibratorRecord]:
    """The calibrators of one file; ``CalibratorFileError`` naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibratorFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibratorFileError(f"{path}: not a JSON calibrator file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("calibrators"), list):
        raise CalibratorFileError(f"{path}: expected an object with a 'calibrators' list")
    records: list[CalibratorRecord] = []
    seen: set[CalibratorKey] = set()
    for i, entry in enumerate(data["calibrators"]):
        try:
            record = record_from_json(entry)
        except CalibratorError as exc:
            raise CalibratorFileError(f"{path}: calibrators[{i}]: {exc}") from None
        if record.key in seen:
            raise CalibratorFileError(
                f"{path}: calibrators[{i}]: a second calibrator for {record.key}"
            )
        seen.add(record.key)
        records.append(record)
    return records


def load_calibrator_files(paths: Iterable[Path]) -> list[CalibratorRecord]:
    """Every calibrator of the files (a later file's calibrator wins for a key)."""
    by_key: dict[CalibratorKey, CalibratorRecord] = {}
    for path in paths:
        for record in load_calibrator_file(path):
            by_key[record.key] = record
    return list(by_key.values())


def write_calibrator_file(path: Path, records: Sequence[CalibratorRecord]) -> None:
    """Write calibrators in the file format ``UFCAL_CALIBRATORS`` loads."""
    body = {"format": FILE_FORMAT, "calibrators": [record_to_json(r) for r in records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")


# -- the service's calibrators -----------------------------------------------------------------


def _metric_view(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else round(float(v), 6)) for k, v in metrics.items()}


class Recalibrator:
    """Active calibrators by key; applies them and refits them from labels."""

    def __init__(self, store: Store, telemetry: Telemetry, config: RecalibrationConfig) -> None:
        self.store = store
        self.telemetry = telemetry
        self.config = config
        self._active: dict[CalibratorKey, Active] = {}
        self._labels: dict[CalibratorKey, int] = {}
        self._last_fit: dict[CalibratorKey, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fitter: Executor | None = None

    # -- request path ----------------------------------------------------------------------

    def active(self, key: CalibratorKey) -> Active | None:
        """The active calibrator of a key, if any."""
        return self._active.get(key)

    def apply(self, key: CalibratorKey, raw: float) -> tuple[float, Active | None]:
        """The confidence to return for a raw score, and the calibrator that made it."""
        active = self._active.get(key)
        if active is None:
            return raw, None
        return recalibrate.apply(active.calibrator, raw), active

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, imported: Sequence[CalibratorRecord] = ()) -> None:
        """Import calibrator files (each version once), then load the active versions and
        the label counts from the store."""
        versions = await self.store.calibrator_versions()
        for record in imported:
            if any(
                v.key == record.key and v.kind == record.kind and v.params == record.params
                for v in versions
            ):
                continue  # imported before (it may have been replaced since: keep that)
            saved = await self.store.save_calibrator(replace(record, version=0, status="active"))
            log.info(
                "calibrator imported",
                extra={"fields": {"key": list(saved.key), "version": saved.version}},
            )
            versions.append(saved)
        for v in versions:
            total = int(v.window.get("total", 0)) if isinstance(v.window, Mapping) else 0
            self._last_fit[v.key] = max(self._last_fit.get(v.key, 0), total)
        self._labels = await self.store.label_counts()
        await self.refresh()
        if self.config.online:  # the first refit should not pay the worker's start-up
            self._spawn(asyncio.get_running_loop().run_in_executor(self._fit_worker(), _warm_up))

    def _fit_worker(self) -> Executor:
        """The process refits run in, started on first use.

        A process of its own, not a thread: a fit never holds the event loop's GIL (in a
        thread, scikit-learn's and numpy's Python parts took time slices from /score under
        load), and with a core to spare it runs beside the loop. ``spawn``, not ``fork``: the
        service has threads (uvicorn's, vLLM's) that a fork would copy in mid-state."""
        if self._fitter is None:
            root = logging.getLogger()
            to_stdout = any(getattr(h, "stream", None) is sys.stdout for h in root.handlers)
            stream: Stream = "stdout" if to_stdout else "stderr"
            self._fitter = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_fit_worker,
                initargs=(root.level, stream),
            )
        return self._fitter

    async def refresh(self) -> None:
        """Re-read the active versions from the store (replicas promote too)."""
        records = await self.store.active_calibrators()
        active: dict[CalibratorKey, Active] = {}
        for record in records:
            current = self._active.get(record.key)
            if current is not None and current.record.version == record.version:
                active[record.key] = current
                continue
            try:
                active[record.key] = Active(record, Calibrator(record.kind, record.params))  # type: ignore[arg-type]
            except CalibratorError as exc:
                log.error(
                    "stored calibrator unusable: %s",
                    exc,
                    extra={"fields": {"key": list(record.key)}},
                )
        self._active = active
        for key, entry in active.items():
            self.telemetry.set_calibrator(key, entry.version, entry.record.labels)

    async def refresh_every(self, interval_s: float) -> None:
        """Refresh forever (a background task of the app)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # the store is closing or failed: keep serving
                log.warning("calibrator refresh failed: %s", exc)

    async def close(self) -> None:
        """Wait for running refits (they only read and write the store), then stop the
        refit worker."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fitter is not None:
            self._fitter.shutdown(wait=False, cancel_futures=True)
            self._fitter = None

    # -- labels and refits -----------------------------------------------------------------

    def on_feedback(self, record: FeedbackRecord) -> None:
        """Count a label; start a refit of its key when one is due (online mode)."""
        key = record.key
        total = self._labels.get(key, 0) + 1
        self._labels[key] = total
        cfg = self.config
        if (
            cfg.online
            and total >= cfg.min_labels
            and total - self._last_fit.get(key, 0) >= cfg.every
        ):
            self._last_fit[key] = total
            self._spawn(self.refit(key))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("refit failed: %s", task.exception())

    async def refit(self, key: CalibratorKey) -> str:
        """Refit ``key`` on its last ``window`` labels in the refit worker process and
        promote the result if it is no worse on the newest labels. Returns the outcome:
        ``promoted``, ``rejected``, ``too_few`` or ``busy`` (another refit of the key holds
        the lock)."""
        async with self.store.refit_lock(key) as got:
            if not got:
                return "busy"
            started = time.perf_counter()
            rows = await self.store.labelled_window(key, self.config.window)
            total = self._labels.get(key, len(rows))
            active = self._active.get(key)
            try:
                decision, kept_at, capped = await asyncio.get_running_loop().run_in_executor(
                    self._fit_worker(),
                    _decide,
                    [r.raw_confidence for r in rows],
                    [r.correct for r in rows],
                    [r.source for r in rows],
                    None if active is None else active.calibrator,
                    self.config,
                )
            except BrokenProcessPool:  # the worker died (e.g. killed): a new one next time
                self._fitter = None
                raise
            kept = [rows[i] for i in kept_at]
            self.telemetry.set_labels_capped(key, capped)
            outcome = await self._record(key, decision, kept, capped, total)
            elapsed = time.perf_counter() - started
            self.telemetry.observe_refit(outcome, elapsed)
            log.info(
                "refit",
                extra={
                    "fields": {
                        "key": list(key),
                        "outcome": outcome,
                        "labels": len(kept),
                        "capped": capped,
                        "seconds": round(elapsed, 3),
                        "candidate_log_loss": decision.candidate_log_loss,
                        "active_log_loss": decision.active_log_loss,
                    }
                },
            )
            return outcome

    async def _record(
        self,
        key: CalibratorKey,
        decision: RefitDecision,
        kept: list[LabelRow],
        capped: int,
        total: int,
    ) -> str:
        result = decision.result
        if result is None:
            return "too_few"
        window = {
            "first": kept[0].received_at,
            "last": kept[-1].received_at,
            "n": len(kept),
            "capped": capped,
            "total": total,
        }
        metrics: dict[str, Any] = {
            "before": _metric_view(result.before),
            "after": _metric_view(result.after),
            "holdout": {
                "n": decision.holdout,
                "candidate_log_loss": decision.candidate_log_loss,
                "active_log_loss": decision.active_log_loss,
            },
        }
        record = await self.store.save_calibrator(
            record_from_fit(
                key,
                result,
                window=window,
                metrics=metrics,
                status="active" if decision.promote else "rejected",
            )
        )
        if not decision.promote:
            return "rejected"
        active = dict(self._active)
        active[key] = Active(record, result.calibrator)
        self._active = active  # one assignment: requests see the old map or the new one
        self.telemetry.set_calibrator(key, record.version, record.labels)
        return "promoted"


def _decide(
    scores: Sequence[float],
    correct: Sequence[bool],
    sources: Sequence[str | None],
    active: Calibrator | None,
    config: RecalibrationConfig,
) -> tuple[RefitDecision, list[int], int]:
    """The refit worker's part, over plain lists (cheap to send to its process): cap the
    sources, fit, judge. Returns the decision, the indices of the labels kept, and how
    many were capped."""
    mask, capped = recalibrate.cap_sources(list(sources), config.max_source_share)
    kept = [i for i, keep in enumerate(mask) if keep]
    if not kept:
        return RefitDecision(None, False), kept, capped
    s = np.array([scores[i] for i in kept], dtype=np.float64)
    y = np.array([correct[i] for i in kept], dtype=bool)
    return recalibrate.refit(s, y, active, config.policy()), kept, capped


def _init_fit_worker(level: int, stream: Stream) -> None:
    """The refit worker logs (and logs its warnings, e.g. scikit-learn's) as JSON lines on
    the stream the service logs to."""
    log_json_lines(level, stream)


def _warm_up() -> None:
    with contextlib.suppress(Exception):
        recalibrate.fit_kind("platt", [0.2, 0.8, 0.3, 0.7], [False, True, False, True])
