"""Scores and feedback in SQLite, and the live calibration window over them.

One dedicated writer thread owns the only connection. Callers submit operations from the
event loop and await them; the thread runs whatever is queued in one transaction (group
commit) and resolves each operation in order. The database is in WAL mode and commits a
batch with

* ``synchronous=NORMAL`` when it holds only scores: the commit writes the WAL but does not
  fsync, so the /score hot path never waits on the disk (a committed score survives a killed
  process; only an OS crash or power loss may drop the last scores before a checkpoint);
* ``synchronous=FULL`` when it holds feedback: the WAL is fsynced before the commit returns,
  so feedback is durable before /feedback answers.

The live window is the last ``window`` scores with feedback, in the order the feedback
arrived; it is loaded from the database at start-up and updated after each committed
feedback, and its calibration report is recomputed then (``service.calibration.metrics``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from service.calibration.metrics import ReliabilityBin, calibration_report

__all__ = [
    "CalibratorKey",
    "CalibratorRecord",
    "FeedbackExists",
    "FeedbackRecord",
    "GoldIndexOutOfRange",
    "LabelRow",
    "LiveCalibration",
    "ScoreConflict",
    "ScoreRecord",
    "Store",
    "StoreError",
    "StoredScore",
    "UnknownScore",
    "live_calibration",
]

log = logging.getLogger("ufcal.store")
T = TypeVar("T")

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    id           TEXT PRIMARY KEY,
    created_at   REAL NOT NULL,
    model        TEXT NOT NULL,
    method       TEXT NOT NULL,
    mode         TEXT NOT NULL,
    answer_index INTEGER NOT NULL,
    confidence   REAL NOT NULL,
    uncertainty  REAL NOT NULL,
    n_options    INTEGER NOT NULL,
    question     TEXT,
    options      TEXT,
    raw_confidence     REAL,
    calibrator_version INTEGER
);
CREATE TABLE IF NOT EXISTS feedback (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE REFERENCES scores(id),
    correct     INTEGER NOT NULL CHECK (correct IN (0, 1)),
    gold_index  INTEGER,
    received_at REAL NOT NULL,
    source      TEXT
);
CREATE TABLE IF NOT EXISTS calibrators (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    model        TEXT NOT NULL,
    method       TEXT NOT NULL,
    mode         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    params       TEXT NOT NULL,
    labels       INTEGER NOT NULL,
    positives    INTEGER NOT NULL,
    negatives    INTEGER NOT NULL,
    window_json  TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    fitted_at    REAL NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'retired', 'rejected')),
    UNIQUE (model, method, mode, version)
);
CREATE INDEX IF NOT EXISTS scores_created_at ON scores(created_at);
"""
#: Version 1 -> 2: the raw score and calibrator version of each score, the source of each
#: feedback (the calibrators table is created by the schema above).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE scores ADD COLUMN raw_confidence REAL",
    "ALTER TABLE scores ADD COLUMN calibrator_version INTEGER",
    "ALTER TABLE feedback ADD COLUMN source TEXT",
)
#: Most operations committed together in one transaction.
MAX_BATCH = 256
#: Ids per ``IN (...)`` query (SQLite's default limit on variables is 32766).
_MAX_SQL_VARIABLES = 500
_UPSERT_SCORE = (
    "INSERT INTO scores (id, created_at, model, method, mode, answer_index, confidence, "
    "uncertainty, n_options, question, options, raw_confidence, calibrator_version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET created_at = excluded.created_at, model = excluded.model, "
    "method = excluded.method, mode = excluded.mode, answer_index = excluded.answer_index, "
    "confidence = excluded.confidence, uncertainty = excluded.uncertainty, "
    "n_options = excluded.n_options, question = excluded.question, options = excluded.options, "
    "raw_confidence = excluded.raw_confidence, calibrator_version = excluded.calibrator_version"
)


class StoreError(Exception):
    """A request the store refuses (the HTTP layer maps each kind to a status)."""


class UnknownScore(StoreError):
    """No score with this id."""


class FeedbackExists(StoreError):
    """The score already has feedback."""


class ScoreConflict(StoreError):
    """A score with this id already has feedback, so it cannot be replaced."""


class GoldIndexOutOfRange(StoreError):
    """``gold_index`` is not an option of the scored question."""

    def __init__(self, gold_index: int, n_options: int) -> None:
        super().__init__(
            f"gold_index {gold_index} is out of range: the question had {n_options} options "
            f"(0..{n_options - 1})"
        )
        self.gold_index = gold_index
        self.n_options = n_options


@dataclass(frozen=True)
class ScoreRecord:
    """What is kept of one successful score (texts only when UFCAL_LOG_TEXT is set)."""

    id: str
    model: str
    method: str
    mode: str
    answer_index: int
    confidence: float
    uncertainty: float
    n_options: int
    created_at: float
    question: str | None = None
    options: Sequence[str] | None = None
    #: The method's own score (``confidence`` is what was returned); None = the same.
    raw_confidence: float | None = None
    calibrator_version: int | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    """A recorded feedback, with the score it judges."""

    id: str
    correct: bool
    gold_index: int | None
    answer_index: int
    confidence: float
    received_at: float
    raw_confidence: float = 0.0
    model: str = ""
    method: str = ""
    mode: str = ""
    source: str | None = None


#: The key of a calibrator: (model, method, mode).
CalibratorKey = tuple[str, str, str]


@dataclass(frozen=True)
class CalibratorRecord:
    """One stored calibrator version (the ``calibrators`` table; JSON columns decoded)."""

    model: str
    method: str
    mode: str
    version: int
    kind: str
    params: dict[str, Any]
    labels: int
    positives: int
    negatives: int
    window: dict[str, Any]
    metrics: dict[str, Any]
    fitted_at: float
    status: str

    @property
    def key(self) -> CalibratorKey:
        return (self.model, self.method, self.mode)


@dataclass(frozen=True)
class LabelRow:
    """One label of a key's window: the raw score, the truth, who sent it, when."""

    raw_confidence: float
    correct: bool
    source: str | None
    received_at: float


@dataclass(frozen=True)
class StoredScore:
    """A stored score with its feedback, if any (``correct`` is ``None`` without)."""

    score: ScoreRecord
    correct: bool | None = None
    gold_index: int | None = None
    feedback_at: float | None = None


@dataclass(frozen=True)
class LiveCalibration:
    """Calibration of the live window; every metric is ``None`` when ``n == 0``."""

    n: int
    window: int
    n_bins: int
    accuracy: float | None
    ece: float | None
    ipr: float | None
    ce: float | None
    brier: float | None
    auroc: float | None
    bins: tuple[ReliabilityBin, ...]


def live_calibration(
    confidences: Sequence[float], correct: Sequence[bool], window: int, n_bins: int
) -> LiveCalibration:
    """The metrics of ``calibration_report`` over a window, or nulls (and empty bins) if empty."""
    if not confidences:
        empty = tuple(
            ReliabilityBin(i / n_bins, (i + 1) / n_bins, 0, None, None) for i in range(n_bins)
        )
        return LiveCalibration(0, window, n_bins, None, None, None, None, None, None, empty)
    r = calibration_report(confidences, correct, n_bins)
    # ``+ 0.0`` turns a -0.0 (float noise of a clamp) into 0.0 in the JSON and the gauges.
    return LiveCalibration(
        r.n,
        window,
        n_bins,
        r.accuracy + 0.0,
        r.ece + 0.0,
        r.ipr + 0.0,
        r.ce + 0.0,
        r.brier + 0.0,
        None if r.auroc is None else r.auroc + 0.0,
        r.bins,
    )


Op = Callable[[sqlite3.Connection], Any]


@dataclass
class _Job:
    op: Op
    durable: bool
    future: concurrent.futures.Future[Any]
    after_commit: Callable[[Any], None] | None = None


class Store:
    """SQLite store of scores and feedback with a dedicated writer thread.

    Build with :meth:`open` and finish with :meth:`close`; every other method is called from
    the event loop.
    """

    def __init__(
        self, path: str | Path, *, window: int = 1000, n_bins: int = 10, keep_text: bool = False
    ) -> None:
        if window < 1 or n_bins < 1:
            raise ValueError("window and n_bins must be >= 1")
        self.path = str(path)
        self.window = window
        self.n_bins = n_bins
        self.keep_text = keep_text
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pending_scores: list[tuple[ScoreRecord, asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._submit_lock = threading.Lock()
        self._lock = threading.Lock()
        self._conf: deque[float] = deque(maxlen=window)
        self._raw: deque[float] = deque(maxlen=window)
        self._correct: deque[bool] = deque(maxlen=window)
        self._report = live_calibration([], [], window, n_bins)
        self._raw_report = self._report
        self._refit_locks: dict[CalibratorKey, asyncio.Lock] = {}
        self._stale = False  # the window changed since the report was computed

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: str | Path, *, window: int = 1000, n_bins: int = 10, keep_text: bool = False
    ) -> Store:
        """Open (or create) the database, load the live window and start the writer."""
        store = cls(path, window=window, n_bins=n_bins, keep_text=keep_text)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        store._thread = threading.Thread(
            target=store._run, args=(ready,), name="ufcal-store", daemon=True
        )
        store._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Finish queued work, checkpoint the WAL and close the connection."""
        if self._thread is None:
            return
        self._flush_scores()  # scores saved in this loop turn go before the writer stops
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        thread, self._thread = self._thread, None
        with self._submit_lock:
            self._closed = True
            self._queue.put(None)
        await asyncio.to_thread(thread.join)

    def _connect(self) -> sqlite3.Connection:
        """Open the database in WAL mode, create the schema and load the live window."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                for statement in _MIGRATE_1_TO_2:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            conn.executescript(_SCHEMA)
            if version == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}"
                )
            rows = conn.execute(
                "SELECT s.confidence, COALESCE(s.raw_confidence, s.confidence), f.correct "
                "FROM feedback f JOIN scores s ON s.id = f.id ORDER BY f.seq DESC LIMIT ?",
                (self.window,),
            ).fetchall()
        except BaseException:
            conn.close()
            raise
        with self._lock:
            for confidence, raw, correct in reversed(rows):
                self._conf.append(float(confidence))
                self._raw.append(float(raw))
                self._correct.append(bool(correct))
            self._recompute()
        return conn

    # -- operations ------------------------------------------------------------------------

    async def save_score(self, record: ScoreRecord) -> None:
        """Insert a score, or replace one with the same id that has no feedback yet.

        Raises ``ScoreConflict`` if the id already has feedback (the old score is kept).
        Scores saved during one turn of the event loop go to the writer as one operation:
        one hand-off to its thread instead of one per score (the hand-offs were most of the
        store's cost per /score under load, and the waits behind them the p99)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_scores.append((record, waiter))
        if len(self._pending_scores) == 1:
            asyncio.get_running_loop().call_soon(self._flush_scores)
        await waiter

    def _flush_scores(self) -> None:
        batch, self._pending_scores = self._pending_scores, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._write_scores(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write_scores(self, batch: list[tuple[ScoreRecord, asyncio.Future[None]]]) -> None:
        records = [record for record, _ in batch]
        try:
            conflicts: set[str] = await self._submit(self._upsert_scores(records), durable=False)
        except Exception as exc:
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for record, waiter in batch:
            if waiter.done():  # its request was cancelled meanwhile
                continue
            if record.id in conflicts:
                waiter.set_exception(
                    ScoreConflict(f"id {record.id!r} already has feedback; score it under a new id")
                )
            else:
                waiter.set_result(None)

    def _upsert_scores(self, records: Sequence[ScoreRecord]) -> Op:
        """The writer's operation for a batch of scores: the ids that already have feedback
        are refused (returned), the others inserted or replaced, in order."""
        rows = [
            (
                r.id,
                r.created_at,
                r.model,
                r.method,
                r.mode,
                r.answer_index,
                r.confidence,
                r.uncertainty,
                r.n_options,
                r.question if self.keep_text else None,
                json.dumps(list(r.options)) if self.keep_text and r.options else None,
                r.confidence if r.raw_confidence is None else r.raw_confidence,
                r.calibrator_version,
            )
            for r in records
        ]

        def op(conn: sqlite3.Connection) -> set[str]:
            ids = list(dict.fromkeys(r.id for r in records))
            conflicts: set[str] = set()
            for i in range(0, len(ids), _MAX_SQL_VARIABLES):
                chunk = ids[i : i + _MAX_SQL_VARIABLES]
                marks = ",".join("?" * len(chunk))
                # only "?" placeholders are formatted in; the ids are bound parameters
                query = f"SELECT id FROM feedback WHERE id IN ({marks})"  # noqa: S608
                found = conn.execute(query, chunk)
                conflicts.update(row[0] for row in found)
            conn.executemany(_UPSERT_SCORE, [row for row in rows if row[0] not in conflicts])
            return conflicts

        return op

    async def add_feedback(
        self,
        score_id: str,
        *,
        correct: bool | None = None,
        gold_index: int | None = None,
        source: str | None = None,
    ) -> FeedbackRecord:
        """Record the truth for a stored score; durable (fsynced) when this returns.

        Give exactly one of ``correct`` and ``gold_index``; ``source`` is a hash of the API
        key that sent it (never the key). Raises ``UnknownScore``, ``FeedbackExists`` or
        ``GoldIndexOutOfRange``.
        """
        if (correct is None) == (gold_index is None):
            raise ValueError("give exactly one of correct and gold_index")

        def op(conn: sqlite3.Connection) -> FeedbackRecord:
            row = conn.execute(
                "SELECT answer_index, confidence, n_options, "
                "COALESCE(raw_confidence, confidence), model, method, mode "
                "FROM scores WHERE id = ?",
                (score_id,),
            ).fetchone()
            if row is None:
                raise UnknownScore(f"no score with id {score_id!r}")
            answer_index, confidence, n_options = int(row[0]), float(row[1]), int(row[2])
            if conn.execute("SELECT 1 FROM feedback WHERE id = ?", (score_id,)).fetchone():
                raise FeedbackExists(f"id {score_id!r} already has feedback")
            if gold_index is not None and not 0 <= gold_index < n_options:
                raise GoldIndexOutOfRange(gold_index, n_options)
            is_correct = bool(correct) if gold_index is None else gold_index == answer_index
            now = time.time()
            conn.execute(
                "INSERT INTO feedback (id, correct, gold_index, received_at, source) "
                "VALUES (?, ?, ?, ?, ?)",
                (score_id, int(is_correct), gold_index, now, source),
            )
            return FeedbackRecord(
                score_id,
                is_correct,
                gold_index,
                answer_index,
                confidence,
                now,
                raw_confidence=float(row[3]),
                model=str(row[4]),
                method=str(row[5]),
                mode=str(row[6]),
                source=source,
            )

        def after_commit(record: FeedbackRecord) -> None:
            with self._lock:
                self._conf.append(record.confidence)
                self._raw.append(record.raw_confidence)
                self._correct.append(record.correct)
                self._stale = True

        result: FeedbackRecord = await self._submit(op, durable=True, after_commit=after_commit)
        return result

    async def recent_scores(self, limit: int) -> list[StoredScore]:
        """The last ``limit`` scores, newest first, each with its feedback if it has one.

        Read by the writer thread (the only connection), so it sees every committed write."""

        def op(conn: sqlite3.Connection) -> list[StoredScore]:
            rows = conn.execute(
                "SELECT s.id, s.model, s.method, s.mode, s.answer_index, s.confidence, "
                "s.uncertainty, s.n_options, s.created_at, s.question, s.options, "
                "f.correct, f.gold_index, f.received_at "
                "FROM scores s LEFT JOIN feedback f ON f.id = s.id "
                "ORDER BY s.created_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                StoredScore(
                    ScoreRecord(
                        id=r[0],
                        model=r[1],
                        method=r[2],
                        mode=r[3],
                        answer_index=int(r[4]),
                        confidence=float(r[5]),
                        uncertainty=float(r[6]),
                        n_options=int(r[7]),
                        created_at=float(r[8]),
                        question=r[9],
                        options=None if r[10] is None else tuple(json.loads(r[10])),
                    ),
                    correct=None if r[11] is None else bool(r[11]),
                    gold_index=r[12],
                    feedback_at=r[13],
                )
                for r in rows
            ]

        result: list[StoredScore] = await self._submit(op, durable=False)
        return result

    def calibration(self) -> LiveCalibration:
        """The live window's calibration of the returned confidence, as of the last
        committed feedback."""
        with self._lock:
            return self._report

    def raw_calibration(self) -> LiveCalibration:
        """The same window's calibration of the methods' raw scores."""
        with self._lock:
            return self._raw_report

    def _recompute(self) -> None:
        correct = list(self._correct)
        self._report = live_calibration(list(self._conf), correct, self.window, self.n_bins)
        self._raw_report = live_calibration(list(self._raw), correct, self.window, self.n_bins)

    # -- calibrators -------------------------------------------------------------------------

    async def save_calibrator(self, record: CalibratorRecord) -> CalibratorRecord:
        """Store a calibrator version; returns it with its version number (the key's next,
        assigned in the same transaction when ``record.version`` is 0). Saving one as
        ``active`` retires the key's previous active version atomically."""

        def op(conn: sqlite3.Connection) -> CalibratorRecord:
            version = record.version
            if version <= 0:
                (latest,) = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM calibrators "
                    "WHERE model = ? AND method = ? AND mode = ?",
                    record.key,
                ).fetchone()
                version = int(latest) + 1
            if record.status == "active":
                conn.execute(
                    "UPDATE calibrators SET status = 'retired' WHERE model = ? AND method = ? "
                    "AND mode = ? AND status = 'active'",
                    record.key,
                )
            conn.execute(
                "INSERT INTO calibrators (model, method, mode, version, kind, params, labels, "
                "positives, negatives, window_json, metrics_json, fitted_at, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *record.key,
                    version,
                    record.kind,
                    json.dumps(record.params),
                    record.labels,
                    record.positives,
                    record.negatives,
                    json.dumps(record.window),
                    json.dumps(record.metrics),
                    record.fitted_at,
                    record.status,
                ),
            )
            return replace(record, version=version)

        saved: CalibratorRecord = await self._submit(op, durable=True)
        return saved

    async def calibrator_versions(self) -> list[CalibratorRecord]:
        """Every stored calibrator version, by key and version."""
        return await self._read(
            "SELECT model, method, mode, version, kind, params, labels, positives, negatives, "
            "window_json, metrics_json, fitted_at, status FROM calibrators "
            "ORDER BY model, method, mode, version",
            (),
        )

    async def active_calibrators(self) -> list[CalibratorRecord]:
        """The active version of every key that has one."""
        return await self._read(
            "SELECT model, method, mode, version, kind, params, labels, positives, negatives, "
            "window_json, metrics_json, fitted_at, status FROM calibrators "
            "WHERE status = 'active' ORDER BY model, method, mode",
            (),
        )

    async def _read(self, sql: str, args: tuple[Any, ...]) -> list[CalibratorRecord]:
        def op(conn: sqlite3.Connection) -> list[CalibratorRecord]:
            return [
                CalibratorRecord(
                    model=row[0],
                    method=row[1],
                    mode=row[2],
                    version=int(row[3]),
                    kind=row[4],
                    params=json.loads(row[5]),
                    labels=int(row[6]),
                    positives=int(row[7]),
                    negatives=int(row[8]),
                    window=json.loads(row[9]),
                    metrics=json.loads(row[10]),
                    fitted_at=float(row[11]),
                    status=row[12],
                )
                for row in conn.execute(sql, args)
            ]

        rows: list[CalibratorRecord] = await self._submit(op, durable=False)
        return rows

    async def labelled_window(self, key: CalibratorKey, n: int) -> list[LabelRow]:
        """The key's last ``n`` labels in the order they arrived (oldest first): the raw
        score that was judged, whether it was right, its source, when it came."""

        def op(conn: sqlite3.Connection) -> list[LabelRow]:
            rows = conn.execute(
                "SELECT COALESCE(s.raw_confidence, s.confidence), f.correct, f.source, "
                "f.received_at FROM feedback f JOIN scores s ON s.id = f.id "
                "WHERE s.model = ? AND s.method = ? AND s.mode = ? ORDER BY f.seq DESC LIMIT ?",
                (*key, n),
            ).fetchall()
            return [LabelRow(float(r[0]), bool(r[1]), r[2], float(r[3])) for r in reversed(rows)]

        rows: list[LabelRow] = await self._submit(op, durable=False)
        return rows

    async def label_counts(self) -> dict[CalibratorKey, int]:
        """How many labels each (model, method, mode) has received in all."""

        def op(conn: sqlite3.Connection) -> dict[CalibratorKey, int]:
            rows = conn.execute(
                "SELECT s.model, s.method, s.mode, COUNT(*) FROM feedback f "
                "JOIN scores s ON s.id = f.id GROUP BY s.model, s.method, s.mode"
            )
            return {(r[0], r[1], r[2]): int(r[3]) for r in rows}

        counts: dict[CalibratorKey, int] = await self._submit(op, durable=False)
        return counts

    @contextlib.asynccontextmanager
    async def refit_lock(self, key: CalibratorKey) -> AsyncIterator[bool]:
        """Hold the right to refit ``key``: yields True when this caller got it, False when a
        refit of the key is already running (no waiting). In-process on SQLite (one writer
        process per database file)."""
        lock = self._refit_locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            yield False
            return
        async with lock:
            yield True

    # -- the writer thread -----------------------------------------------------------------

    async def _submit(
        self, op: Op, *, durable: bool, after_commit: Callable[[Any], None] | None = None
    ) -> Any:
        job = _Job(op, durable, concurrent.futures.Future(), after_commit)
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            with self._submit_lock:
                self._closed = True
            ready.set_exception(exc)
            return
        ready.set_result(None)
        synchronous = "FULL"
        stop = False
        try:
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                jobs = [first]
                while len(jobs) < MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    jobs.append(nxt)
                jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
                if not jobs:
                    continue
                # Feedback in the batch: fsync the WAL on commit; scores only: no fsync.
                wanted = "FULL" if any(j.durable for j in jobs) else "NORMAL"
                if wanted != synchronous:
                    conn.execute(f"PRAGMA synchronous = {wanted}")
                    synchronous = wanted
                self._run_batch(conn, jobs)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:  # pragma: no cover - a broken database: refuse further work
            log.exception("store: writer stopped")
        finally:
            conn.close()
            with self._submit_lock:
                self._closed = True
            self._fail_all(RuntimeError("the store is closed"))

    def _run_batch(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """Run jobs in one transaction; each in a savepoint, so a refused one undoes only
        itself. Results are handed out only after the commit."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    value = job.op(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((True, value))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store: transaction failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if ok and job.after_commit is not None:
                try:
                    job.after_commit(value)
                except Exception:  # pragma: no cover - bookkeeping must not lose the reply
                    log.exception("store: after-commit hook failed")
        with self._lock:  # one report per batch, ready before anyone is answered
            if self._stale:
                self._recompute()
                self._stale = False
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    def _fail_all(self, exc: BaseException) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
