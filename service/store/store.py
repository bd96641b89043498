"""The store: scores and feedback in SQLite or PostgreSQL, and the live calibration window.

Promises, on either backend and across replicas sharing a PostgreSQL:

* **Feedback is durable before** :meth:`Store.add_feedback` **returns** (the commit waits
  for the disk), and the first feedback for an id wins: the unique ``feedback.id`` decides
  between racing replicas, the loser gets ``FeedbackExists`` (409).
* **An id with feedback is taken**: a later score with that id is refused
  (``ScoreConflict``, 409) and the judged score is kept.
* **Scores are written off the request path, in batches**: :meth:`Store.save_score` puts the
  score in an in-memory queue that one writer task commits in batches (everything queued
  while the previous batch committed, at most ``MAX_BATCH``), without waiting for the disk.
  The request waits for its batch (to learn about a conflict) at most ``timeout_s``.
* **The database going away** does not fail ``/score``: scores stay queued (up to
  ``score_buffer``, beyond it they are dropped and counted) and the writer retries with
  back-off; ``add_feedback`` raises ``StoreUnavailable`` (503). Both recover by themselves.

The live window of each task (multiple_choice, free_form) is its last ``window`` labels in
arrival order (``feedback.seq``): the two tasks' labels never share a window. A
replica appends its own labels as they commit; on a shared database (PostgreSQL) it also
re-reads the window every ``refresh_s`` seconds, so every replica reports the labels of all
replicas within that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store import migrate
from service.store.backends import Backend, backend_for
from service.store.records import (
    DEFAULT_TASK,
    TASKS,
    CalibratorKey,
    CalibratorRecord,
    FeedbackExists,
    FeedbackRecord,
    GoldIndexOutOfRange,
    LabelRow,
    LiveCalibration,
    ScoreConflict,
    ScoreRecord,
    StoredScore,
    StoreUnavailable,
    Task,
    UnknownScore,
    live_calibration,
)
from service.store.tables import calibrators, feedback, scores

log = logging.getLogger("ufcal.store")

#: Most scores committed in one transaction.
MAX_BATCH = 256
#: Ids per ``IN (...)`` query.
_MAX_SQL_VARIABLES = 500
#: The writer's back-off while the database is unreachable (seconds, doubling).
_RETRY_FIRST_S, _RETRY_MAX_S = 0.2, 5.0
#: When no request waits for the batch, the writer lets scores gather this long first: each
#: batch costs a few round trips to the database whatever its size, and under load those
#: took CPU from the event loop that serves /score.
LINGER_S = 0.05
#: Pauses before looking again for an unknown id on a shared database (seconds).
_UNKNOWN_RETRIES_S = (0.05, 0.1, 0.2)
_SCORE_COLUMNS = [c.name for c in scores.columns if c.name != "id"]


class StoreObserver(Protocol):
    """Who hears about the store's state (the service's telemetry)."""

    def set_live_calibration(
        self, report: LiveCalibration, confidence: str = ..., task: str = ...
    ) -> None: ...
    def set_store_up(self, up: bool) -> None: ...
    def set_score_queue(self, n: int) -> None: ...
    def observe_scores_dropped(self, n: int) -> None: ...


_Label = tuple[int, float, float, bool]


@dataclass
class _PendingScore:
    record: ScoreRecord
    waiter: asyncio.Future[None] | None


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable (as opposed to refusing a row)."""
    if isinstance(exc, (OSError, TimeoutError, InterfaceError, OperationalError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        # asyncpg: lost connections, server shutting down or starting (SQLSTATE 08, 57P)
        code = str(getattr(orig, "sqlstate", "") or "")
        return isinstance(getattr(orig, "__cause__", None), OSError) or code[:2] in ("08", "57")
    return False


def _reason(exc: BaseException, backend: Backend) -> str:
    """One line about ``exc`` that never carries the database password."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    password = backend.url.password
    if password:
        text = text.replace(str(password), "***")
    return f"{type(inner).__name__}: {text}"


class Store:
    """Scores, feedback and the live calibration, on the database ``url`` names.

    Build with :meth:`open` and finish with :meth:`close`; every method is called from the
    event loop.
    """

    def __init__(
        self,
        url: str | Path,
        *,
        window: int = 1000,
        n_bins: int = 10,
        keep_text: bool = False,
        refresh_s: float = 2.0,
        score_buffer: int = 10_000,
        timeout_s: float = 5.0,
        pool_size: int = 8,
        observer: StoreObserver | None = None,
    ) -> None:
        if window < 1 or n_bins < 1:
            raise ValueError("window and n_bins must be >= 1")
        self.backend = backend_for(url, timeout_s, pool_size)
        self.window = window
        self.n_bins = n_bins
        self.keep_text = keep_text
        self.refresh_s = refresh_s
        self.score_buffer = score_buffer
        self.timeout_s = timeout_s
        self.observer = observer
        self.dropped_scores = 0
        self._engine: AsyncEngine | None = None
        self._upsert: Any = None
        self._buffer: deque[_PendingScore] = deque()
        self._pending: dict[str, _PendingScore] = {}  # the newest queued score of each id
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closing = False
        self._up = True
        # Per task: (feedback.seq, returned confidence, raw confidence, correct), oldest first
        self._labels: dict[Task, deque[_Label]] = {t: deque(maxlen=window) for t in TASKS}
        self._since_refresh: list[tuple[Task, _Label]] | None = None
        empty = live_calibration([], [], window, n_bins)
        # Per task: the calibration of the returned confidence and of the raw scores.
        self._reports: dict[Task, tuple[LiveCalibration, LiveCalibration]] = {
            t: (empty, empty) for t in TASKS
        }
        self._stale: set[Task] = set()

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str | Path, **kwargs: Any) -> Store:
        """Connect, run the pending migrations, load the live window, start the writer.

        Raises ``StoreUnavailable`` naming the database (never its password) when it cannot
        be reached or refuses the credentials."""
        try:
            store = cls(url, **kwargs)
        except ValueError as exc:  # an unknown scheme: the message names it, not the URL
            raise StoreUnavailable(str(exc)) from None
        engine = store._engine = store.backend.create_engine()
        try:
            async with asyncio.timeout(max(30.0, 3 * store.timeout_s)):
                await migrate.upgrade(engine, store.backend)
                rows = await store._read_window()
        except Exception as exc:
            await engine.dispose()
            raise StoreUnavailable(
                f"cannot open the store ({store.backend.where()}): {_reason(exc, store.backend)}"
            ) from None
        for task, labels in rows.items():
            store._labels[task].extend(labels)
        store._stale = set(TASKS)
        store._writer = asyncio.create_task(store._write_loop(), name="ufcal-store-writer")
        if store.backend.shared:
            store._refresher = asyncio.create_task(
                store._refresh_loop(), name="ufcal-store-refresh"
            )
        return store

    async def close(self) -> None:
        """Write the queued scores (waiting at most ``timeout_s`` for the database), then
        close the connections."""
        if self._engine is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), max(5.0, self.timeout_s))
            except TimeoutError:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
                log.error(
                    "store closed with scores unwritten",
                    extra={"fields": {"scores_lost": len(self._buffer)}},
                )
        with contextlib.suppress(Exception):
            await self.backend.before_close(self._engine)
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreUnavailable("the store is not open")
        return self._engine

    # -- scores ----------------------------------------------------------------------------

    async def save_score(self, record: ScoreRecord, *, wait: bool = True) -> None:
        """Queue a score for the writer; with ``wait``, wait for its batch (at most
        ``timeout_s``, and not at all while the database is unreachable).

        Raises ``ScoreConflict`` if the id already has feedback (the old score is kept); only
        a waiting caller learns it, so pass ``wait=False`` for an id that cannot be taken
        (one the service made up). A score that finds the queue full is dropped and counted
        (``dropped_scores``)."""
        if self._closing:
            raise StoreUnavailable("the store is closed")
        if not self.backend.storable(record.id):
            log.warning("score not saved: its id cannot be stored in %s", self.backend.name)
            return
        if len(self._buffer) >= self.score_buffer:
            self.dropped_scores += 1
            if self.observer is not None:
                self.observer.observe_scores_dropped(1)
            return
        waiter: asyncio.Future[None] | None = None
        if wait and self._up:
            waiter = asyncio.get_running_loop().create_future()
            waiter.add_done_callback(_retrieve)
        pending = _PendingScore(record, waiter)
        self._buffer.append(pending)
        self._pending[record.id] = pending
        self._wake.set()
        if waiter is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await asyncio.shield(waiter)

    @property
    def queued_scores(self) -> int:
        """Scores waiting for the writer."""
        return len(self._buffer)

    async def _write_loop(self) -> None:
        delay = _RETRY_FIRST_S
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if (
                not self._closing
                and len(self._buffer) < MAX_BATCH
                and not any(p.waiter is not None for p in self._buffer)
            ):
                await asyncio.sleep(LINGER_S)
            batch = list(itertools.islice(self._buffer, MAX_BATCH))
            try:
                try:
                    conflicts = await self._write_scores(
                        [p.record for p in batch],
                        report_conflicts=any(p.waiter is not None for p in batch),
                    )
                except Exception as exc:
                    if connection_lost(exc):
                        raise
                    conflicts = await self._write_one_by_one(batch)  # a row was refused
            except Exception as exc:
                self._set_up(False, exc)
                for pending in batch:  # their requests go on; the scores stay queued
                    if pending.waiter is not None and not pending.waiter.done():
                        pending.waiter.set_result(None)
                    pending.waiter = None
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            delay = _RETRY_FIRST_S
            self._set_up(True)
            self._finish(batch, conflicts)

    async def _write_one_by_one(self, batch: list[_PendingScore]) -> set[str]:
        """Write a batch that the database refused score by score; drop (and count) the
        scores it refuses alone, so that one bad row never blocks the queue."""
        conflicts: set[str] = set()
        for pending in batch:
            try:
                conflicts |= await self._write_scores([pending.record])
            except Exception as exc:
                if connection_lost(exc):
                    raise
                log.error("score not saved: %s", _reason(exc, self.backend))
                self.dropped_scores += 1
                if self.observer is not None:
                    self.observer.observe_scores_dropped(1)
        return conflicts

    def _finish(self, batch: list[_PendingScore], conflicts: set[str]) -> None:
        """Take a written batch off the queue and answer its waiters."""
        for _ in batch:
            done = self._buffer.popleft()
            if self._pending.get(done.record.id) is done:
                del self._pending[done.record.id]
        if self.observer is not None:
            self.observer.set_score_queue(len(self._buffer))
        for pending in batch:
            waiter = pending.waiter
            if pending.record.id in conflicts:
                conflict = ScoreConflict(
                    f"id {pending.record.id!r} already has feedback; score it under a new id"
                )
                if waiter is not None and not waiter.done():
                    waiter.set_exception(conflict)
                elif waiter is None:
                    log.warning("queued score not saved: %s", conflict)
            elif waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _score_row(self, r: ScoreRecord) -> dict[str, Any]:
        return {
            "id": r.id,
            "created_at": r.created_at,
            "model": r.model,
            "method": r.method,
            "mode": r.mode,
            "answer_index": r.answer_index,
            "confidence": r.confidence,
            "uncertainty": r.uncertainty,
            "n_options": r.n_options,
            "question": self.backend.text(r.question) if self.keep_text else None,
            "options": (
                self.backend.text(json.dumps(list(r.options)))
                if self.keep_text and r.options
                else None
            ),
            "raw_confidence": r.confidence if r.raw_confidence is None else r.raw_confidence,
            "calibrator_version": r.calibrator_version,
            "task": r.task,
        }

    def _score_upsert(self) -> Any:
        """The batch upsert of scores, built once: building it cost as much CPU per batch
        as executing it (SQLAlchemy caches the compiled form, not the statement object)."""
        if self._upsert is None:
            insert = self.backend.insert(scores)
            self._upsert = insert.on_conflict_do_update(
                index_elements=[scores.c.id],
                set_={name: insert.excluded[name] for name in _SCORE_COLUMNS},
                # a label committed meanwhile by another replica keeps its score
                where=~exists().where(feedback.c.id == scores.c.id),
            )
        return self._upsert

    async def _write_scores(
        self, records: Sequence[ScoreRecord], *, report_conflicts: bool = True
    ) -> set[str]:
        """Insert or replace a batch of scores in one transaction; returns the ids refused
        because they already have feedback (for a repeated id the last record wins). The
        upsert itself never replaces a judged score: the conflicts are looked up first only
        when someone waits to hear about them."""
        latest = {r.id: r for r in records}
        ids = list(latest) if report_conflicts else []
        conflicts: set[str] = set()
        async with self.engine.connect() as conn:
            await self.backend.prepare_scores(conn)
            for i in range(0, len(ids), _MAX_SQL_VARIABLES):
                chunk = ids[i : i + _MAX_SQL_VARIABLES]
                found = await conn.execute(select(feedback.c.id).where(feedback.c.id.in_(chunk)))
                conflicts.update(found.scalars())
            rows = [self._score_row(r) for i, r in latest.items() if i not in conflicts]
            if rows:
                await conn.execute(self._score_upsert(), rows)
            await conn.commit()
        return conflicts

    # -- feedback --------------------------------------------------------------------------

    async def add_feedback(
        self,
        score_id: str,
        *,
        correct: bool | None = None,
        gold_index: int | None = None,
        source: str | None = None,
    ) -> FeedbackRecord:
        """Record the truth for a stored score; on disk when this returns.

        Give exactly one of ``correct`` and ``gold_index``. Raises ``UnknownScore``,
        ``FeedbackExists``, ``GoldIndexOutOfRange`` or ``StoreUnavailable``.
        """
        if (correct is None) == (gold_index is None):
            raise ValueError("give exactly one of correct and gold_index")
        if self._closing:
            raise StoreUnavailable("the store is closed")
        if not self.backend.storable(score_id):  # so it was never stored
            raise UnknownScore(f"no score with id {score_id!r}")
        await self._written(score_id)
        try:
            async with asyncio.timeout(self.backend.operation_timeout_s):
                record, seq = await self._insert_feedback(score_id, correct, gold_index, source)
                # Scored on another replica a moment ago, its batch maybe not yet committed.
                for delay in _UNKNOWN_RETRIES_S if self.backend.shared else ():
                    if record is not None:
                        break
                    await asyncio.sleep(delay)
                    record, seq = await self._insert_feedback(score_id, correct, gold_index, source)
                if record is None:
                    raise UnknownScore(f"no score with id {score_id!r}")
        except (UnknownScore, FeedbackExists, GoldIndexOutOfRange):
            raise
        except Exception as exc:
            if connection_lost(exc):
                self._set_up(False, exc)
            raise StoreUnavailable(
                f"the database is unavailable ({self.backend.where()}); nothing was recorded"
            ) from exc
        self._set_up(True)
        label = (seq, record.confidence, record.raw_confidence, record.correct)
        self._labels[record.task].append(label)
        if self._since_refresh is not None:
            self._since_refresh.append((record.task, label))
        self._stale.add(record.task)
        return record

    async def _written(self, score_id: str) -> None:
        """Wait until a score of ``score_id`` queued here is committed (or the wait fails)."""
        pending = self._pending.get(score_id)
        if pending is None or not self._up:
            return
        if pending.waiter is None:
            pending.waiter = asyncio.get_running_loop().create_future()
            pending.waiter.add_done_callback(_retrieve)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout_s):
                await asyncio.shield(pending.waiter)

    async def _insert_feedback(
        self, score_id: str, correct: bool | None, gold_index: int | None, source: str | None
    ) -> tuple[FeedbackRecord | None, int]:
        """Insert the label in one durable transaction; ``(None, 0)`` for an unknown id."""
        async with self.engine.connect() as conn:
            await self.backend.prepare_feedback(conn)
            row = (
                await conn.execute(
                    select(
                        scores.c.answer_index,
                        scores.c.confidence,
                        scores.c.n_options,
                        func.coalesce(scores.c.raw_confidence, scores.c.confidence),
                        scores.c.model,
                        scores.c.method,
                        scores.c.mode,
                        scores.c.task,
                    )
                    .where(scores.c.id == score_id)
                    .with_for_update()  # a re-score of this id waits for our commit
                )
            ).first()
            if row is None:
                return None, 0
            answer_index, confidence, n_options = int(row[0]), float(row[1]), int(row[2])
            taken = await conn.execute(select(feedback.c.seq).where(feedback.c.id == score_id))
            if taken.first() is not None:
                raise FeedbackExists(f"id {score_id!r} already has feedback")
            if gold_index is not None and not 0 <= gold_index < n_options:
                raise GoldIndexOutOfRange(gold_index, n_options)
            is_correct = bool(correct) if gold_index is None else gold_index == answer_index
            now = time.time()
            insert = self.backend.insert(feedback).values(
                id=score_id,
                correct=is_correct,
                gold_index=gold_index,
                received_at=now,
                source=source,
                task=_task(row[7]),
            )
            # Two replicas racing: the unique id makes the second insert do nothing.
            inserted = await conn.execute(
                insert.on_conflict_do_nothing(index_elements=[feedback.c.id]).returning(
                    feedback.c.seq
                )
            )
            seq = inserted.scalar()
            if seq is None:
                raise FeedbackExists(f"id {score_id!r} already has feedback")
            await conn.commit()
        record = FeedbackRecord(
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
            task=_task(row[7]),
        )
        return record, int(seq)

    # -- live calibration ------------------------------------------------------------------

    def calibration(self, task: Task = DEFAULT_TASK) -> LiveCalibration:
        """The live window's calibration of one task: this replica's labels as they commit,
        and on a shared database everyone's as of the last refresh."""
        return self._recompute(task)[0]

    def raw_calibration(self, task: Task = DEFAULT_TASK) -> LiveCalibration:
        """The same window's calibration of the methods' raw scores."""
        return self._recompute(task)[1]

    def _recompute(self, task: Task) -> tuple[LiveCalibration, LiveCalibration]:
        if task in self._stale:
            labels = self._labels[task]
            correct = [k for *_, k in labels]
            self._reports[task] = (
                live_calibration([c for _, c, _, _ in labels], correct, self.window, self.n_bins),
                live_calibration([r for _, _, r, _ in labels], correct, self.window, self.n_bins),
            )
            self._stale.discard(task)
        return self._reports[task]

    async def _read_window(self) -> dict[Task, list[_Label]]:
        """Each task's last ``window`` labels from the database, oldest first."""
        windows: dict[Task, list[_Label]] = {}
        async with self.engine.connect() as conn:
            for task in TASKS:
                query = (
                    select(
                        feedback.c.seq,
                        scores.c.confidence,
                        func.coalesce(scores.c.raw_confidence, scores.c.confidence),
                        feedback.c.correct,
                    )
                    .join_from(feedback, scores, feedback.c.id == scores.c.id)
                    .where(feedback.c.task == task)
                    .order_by(feedback.c.seq.desc())
                    .limit(self.window)
                )
                rows = (await conn.execute(query)).all()
                windows[task] = [
                    (int(s), float(c), float(r), bool(k)) for s, c, r, k in reversed(rows)
                ]
        return windows

    async def refresh(self) -> bool:
        """Re-read the live window from the database (every replica's labels); False if the
        database did not answer."""
        self._since_refresh = []
        try:
            async with asyncio.timeout(self.timeout_s):
                rows = await self._read_window()
        except Exception as exc:
            self._set_up(False, exc)
            return False
        finally:
            mine, self._since_refresh = self._since_refresh, None
        self._set_up(True)
        for task in TASKS:
            merged = {label[0]: label for label in rows[task]}
            for label_task, label in mine or ():  # committed here while the query ran
                if label_task == task:
                    merged[label[0]] = label
            fresh = [merged[seq] for seq in sorted(merged)[-self.window :]]
            if fresh != list(self._labels[task]):
                self._labels[task] = deque(fresh, maxlen=self.window)
                self._stale.add(task)
                if self.observer is not None:
                    self.observer.set_live_calibration(self.calibration(task), "returned", task)
                    self.observer.set_live_calibration(self.raw_calibration(task), "raw", task)
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - keep refreshing whatever happened
                log.exception("store: live window refresh failed")

    async def recent_scores(self, limit: int) -> list[StoredScore]:
        """The last ``limit`` committed scores, newest first, each with its feedback if it
        has one (a score still in the writer's queue is not among them yet)."""
        s, f = scores.c, feedback.c
        query = (
            select(
                s.id,
                s.model,
                s.method,
                s.mode,
                s.answer_index,
                s.confidence,
                s.uncertainty,
                s.n_options,
                s.created_at,
                s.question,
                s.options,
                f.correct,
                f.gold_index,
                f.received_at,
                s.task,
            )
            .select_from(scores.outerjoin(feedback, f.id == s.id))
            .order_by(s.created_at.desc())
            .limit(limit)
        )
        try:
            async with asyncio.timeout(self.backend.operation_timeout_s):
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(query)).all()
        except Exception as exc:
            if connection_lost(exc):
                self._set_up(False, exc)
            raise StoreUnavailable(f"the database is unavailable ({self.backend.where()})") from exc
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
                    task=_task(r[14]),
                ),
                correct=None if r[11] is None else bool(r[11]),
                gold_index=r[12],
                feedback_at=r[13],
            )
            for r in rows
        ]

    # -- calibrators (issue 10's recalibration) -----------------------------------------------

    async def save_calibrator(self, record: CalibratorRecord) -> CalibratorRecord:
        """Store a calibrator version; returns it with its version number (the key's next,
        assigned in the same transaction when ``record.version`` is 0). Saving one as
        ``active`` retires the key's previous active version in the same transaction."""
        key_is = (
            (calibrators.c.model == record.model)
            & (calibrators.c.method == record.method)
            & (calibrators.c.mode == record.mode)
            & (calibrators.c.task == record.task)
        )
        async with self.engine.connect() as conn:
            await self.backend.prepare_feedback(conn)  # durable, like a label
            version = record.version
            if version <= 0:
                latest = await conn.execute(
                    select(func.coalesce(func.max(calibrators.c.version), 0)).where(key_is)
                )
                version = int(latest.scalar_one()) + 1
            if record.status == "active":
                await conn.execute(
                    update(calibrators)
                    .where(key_is & (calibrators.c.status == "active"))
                    .values(status="retired")
                )
            await conn.execute(
                calibrators.insert().values(
                    model=record.model,
                    method=record.method,
                    mode=record.mode,
                    task=record.task,
                    version=version,
                    kind=record.kind,
                    params=json.dumps(record.params),
                    labels=record.labels,
                    positives=record.positives,
                    negatives=record.negatives,
                    window_json=json.dumps(record.window),
                    metrics_json=json.dumps(record.metrics),
                    fitted_at=record.fitted_at,
                    status=record.status,
                )
            )
            await conn.commit()
        return replace(record, version=version)

    async def calibrator_versions(self) -> list[CalibratorRecord]:
        """Every stored calibrator version, by key and version."""
        return await self._read_calibrators(active_only=False)

    async def active_calibrators(self) -> list[CalibratorRecord]:
        """The active version of every key that has one."""
        return await self._read_calibrators(active_only=True)

    async def _read_calibrators(self, *, active_only: bool) -> list[CalibratorRecord]:
        c = calibrators.c
        query = select(
            c.model, c.method, c.mode, c.version, c.kind, c.params, c.labels, c.positives,
            c.negatives, c.window_json, c.metrics_json, c.fitted_at, c.status, c.task,
        ).order_by(c.model, c.method, c.mode, c.task, c.version)  # fmt: skip
        if active_only:
            query = query.where(c.status == "active")
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
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
                window=json.loads(row[9] or "{}"),
                metrics=json.loads(row[10] or "{}"),
                fitted_at=float(row[11]),
                status=row[12],
                task=_task(row[13]),
            )
            for row in rows
        ]

    async def labelled_window(self, key: CalibratorKey, n: int) -> list[LabelRow]:
        """The key's last ``n`` labels in the order they arrived (oldest first): the raw
        score that was judged, whether it was right, its source, when it came."""
        model, method, mode, task = key
        query = (
            select(
                func.coalesce(scores.c.raw_confidence, scores.c.confidence),
                feedback.c.correct,
                feedback.c.source,
                feedback.c.received_at,
            )
            .join_from(feedback, scores, feedback.c.id == scores.c.id)
            .where((scores.c.model == model) & (scores.c.method == method))
            .where((scores.c.mode == mode) & (scores.c.task == task))
            .order_by(feedback.c.seq.desc())
            .limit(n)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [LabelRow(float(r[0]), bool(r[1]), r[2], float(r[3])) for r in reversed(rows)]

    async def label_counts(self) -> dict[CalibratorKey, int]:
        """How many labels each (model, method, mode, task) has received in all."""
        s = scores.c
        query = (
            select(s.model, s.method, s.mode, s.task, func.count())
            .join_from(feedback, scores, feedback.c.id == s.id)
            .group_by(s.model, s.method, s.mode, s.task)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(r[0], r[1], r[2], _task(r[3])): int(r[4]) for r in rows}

    # -- locks -----------------------------------------------------------------------------

    def refit_lock(self, key: str | Sequence[str]) -> contextlib.AbstractAsyncContextManager[bool]:
        """``async with store.refit_lock(key) as mine:`` — ``mine`` is whether this process
        may refit ``key`` now; on PostgreSQL only one replica at a time holds it."""
        name = key if isinstance(key, str) else "/".join(key)
        return self.backend.try_lock(self.engine, f"ufcal:refit:{name}")

    # -- health ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether the last database operation succeeded."""
        return self._up

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            log.warning(
                "database reachable again",
                extra={"fields": {"db": self.backend.where(), "scores_queued": len(self._buffer)}},
            )
            self._wake.set()
        else:
            reason = _reason(exc, self.backend) if exc is not None else "unknown"
            log.error(
                "database unreachable: %s",
                reason,
                extra={"fields": {"db": self.backend.where(), "scores_queued": len(self._buffer)}},
            )
        if self.observer is not None:
            self.observer.set_store_up(up)


def _task(value: object) -> Task:
    """A stored task (a value this ufcal does not know reads as the default)."""
    return next((t for t in TASKS if t == value), DEFAULT_TASK)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a waiter's exception as seen (its request may have gone)."""
    if not future.cancelled():
        future.exception()
