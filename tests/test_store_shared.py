"""The store shared by replicas (two ``Store`` objects on one real PostgreSQL), its locks,
migrations, and what it does when the database is wrong or goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from service.store import (
    CalibratorRecord,
    FeedbackExists,
    ScoreRecord,
    Store,
    StoreUnavailable,
    UnknownScore,
)
from service.store.migrate import head_revision
from tests.postgres import PASSWORD, PostgresServer
from tests.test_feedback import _settings, fetch, gauges, question, serve


def _score(score_id: str, confidence: float = 0.5) -> ScoreRecord:
    return ScoreRecord(score_id, "m", "uf", "logprobs", 0, confidence, 0.5, 4, time.time())


@contextlib.asynccontextmanager
async def replicas(url: str, n: int = 2, **kwargs: Any) -> AsyncIterator[list[Store]]:
    stores = [await Store.open(url, **kwargs) for _ in range(n)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@contextlib.contextmanager
def database_down(server: PostgresServer) -> Any:
    """Stop the PostgreSQL server for the block (a clean shutdown: an immediate one may lose
    the last scores, committed without waiting for the disk); start it again after."""
    server.stop("fast")
    try:
        yield
    finally:
        server.start()


# ---------------------------------------------------------------- across replicas


async def test_racing_feedback_from_two_replicas_gives_one_winner(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    async with replicas(url) as (a, b):
        ids = [f"race{i}" for i in range(30)]
        await asyncio.gather(*(a.save_score(_score(i)) for i in ids))
        outcomes = await asyncio.gather(
            *(s.add_feedback(i, correct=True) for i in ids for s in (a, b)),
            return_exceptions=True,
        )
    for i in range(len(ids)):
        pair = outcomes[2 * i : 2 * i + 2]
        assert sorted(type(o).__name__ for o in pair) == ["FeedbackExists", "FeedbackRecord"]
    assert await fetch(url, "SELECT COUNT(*) FROM feedback") == [(30,)]


async def test_every_replica_reports_every_label(postgres: PostgresServer) -> None:
    async with replicas(postgres.new_database(), refresh_s=3600) as (a, b):
        for i, conf in enumerate((0.9, 0.8, 0.3)):
            await a.save_score(_score(f"a{i}", conf))
        await b.add_feedback("a0", correct=True)  # scored on A, labelled on B
        await a.add_feedback("a1", correct=False)
        await b.add_feedback("a2", gold_index=1)
        assert a.calibration().n == 1 and b.calibration().n == 2  # before a refresh
        assert await a.refresh() and await b.refresh()
        assert a.calibration() == b.calibration()
        assert a.calibration().n == 3
        with pytest.raises(FeedbackExists):
            await a.add_feedback("a0", correct=False)


async def test_refit_lock_has_one_holder_at_a_time(db: str) -> None:
    async with replicas(db) as (a, b):
        async with a.refit_lock(("m", "uf", "logprobs")) as mine:
            assert mine
            other = b if a.backend.shared else a  # SQLite: one process, one store
            async with other.refit_lock(("m", "uf", "logprobs")) as theirs:
                assert not theirs
            async with other.refit_lock(("m", "uf", "sampling")) as unrelated:
                assert unrelated
        async with b.refit_lock(("m", "uf", "logprobs")) as after:
            assert after


# ---------------------------------------------------------------- migrations


async def test_a_pre_migration_sqlite_file_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            CREATE TABLE scores (id TEXT PRIMARY KEY, created_at REAL NOT NULL,
              model TEXT NOT NULL, method TEXT NOT NULL, mode TEXT NOT NULL,
              answer_index INTEGER NOT NULL, confidence REAL NOT NULL,
              uncertainty REAL NOT NULL, n_options INTEGER NOT NULL, question TEXT,
              options TEXT);
            CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT,
              id TEXT NOT NULL UNIQUE REFERENCES scores(id),
              correct INTEGER NOT NULL CHECK (correct IN (0, 1)), gold_index INTEGER,
              received_at REAL NOT NULL);
            INSERT INTO scores VALUES ('old', 1.0, 'm', 'uf', 'logprobs', 0, 0.8, 0.2, 4,
              NULL, NULL);
            INSERT INTO feedback (id, correct, gold_index, received_at) VALUES
              ('old', 1, NULL, 2.0);
            PRAGMA user_version = 1;
            """
        )
    store = await Store.open(path)
    try:
        assert store.calibration().n == 1
        with pytest.raises(FeedbackExists):
            await store.add_feedback("old", correct=False)
        await store.save_score(_score("new"))
        assert (await store.add_feedback("new", correct=True)).correct
    finally:
        await store.close()
    rows = await fetch(str(path), "SELECT version_num FROM alembic_version")
    assert rows == [(head_revision(),)]
    columns = {r[1] for r in await fetch(str(path), "PRAGMA table_info(scores)")}
    assert {"raw_confidence", "calibrator_version"} <= columns


async def test_migrations_run_once_when_replicas_start_together(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    stores = await asyncio.gather(*(Store.open(url) for _ in range(3)))
    for store in stores:
        await store.close()
    assert await fetch(url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]


# ---------------------------------------------------------------- bad database URLs


@pytest.mark.parametrize("problem", ["password", "port", "host"])
async def test_a_wrong_database_fails_fast_naming_the_host_not_the_password(
    postgres: PostgresServer, problem: str
) -> None:
    secret = "s3cret-Pa55"
    url = {
        "password": postgres.url(password=secret),
        "port": f"postgresql://postgres:{secret}@127.0.0.1:1/postgres",
        "host": f"postgresql://postgres:{secret}@db.invalid:5432/postgres",
    }[problem]
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await Store.open(url, timeout_s=2.0)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert secret not in message and PASSWORD not in message
    assert ("db.invalid" if problem == "host" else "127.0.0.1") in message


async def test_an_unknown_scheme_is_refused_by_name() -> None:
    with pytest.raises(StoreUnavailable, match="'mysql' is not supported") as caught:
        await Store.open("mysql://u:topsecret@h/db")
    assert "topsecret" not in str(caught.value)


# ---------------------------------------------------------------- the database going away


async def test_database_away_scores_queue_then_drop_feedback_fails_then_recovers(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    store = await Store.open(url, score_buffer=5, timeout_s=2.0)
    try:
        await store.save_score(_score("before"))
        with database_down(postgres):
            started = time.monotonic()
            for i in range(8):
                await store.save_score(_score(f"down{i}"))
            assert time.monotonic() - started < 5  # the requests were not held
            assert not store.up
            assert store.queued_scores == 5 and store.dropped_scores == 3
            with pytest.raises(StoreUnavailable):
                await store.add_feedback("before", correct=True)
        for _ in range(100):  # the writer retries by itself
            if store.queued_scores == 0:
                break
            await asyncio.sleep(0.1)
        assert store.queued_scores == 0 and store.up
        assert (await store.add_feedback("down0", correct=True)).correct
        assert (await store.add_feedback("before", correct=False)).correct is False
    finally:
        await store.close()
    ids = {r[0] for r in await fetch(url, "SELECT id FROM scores")}
    assert ids == {"before", *(f"down{i}" for i in range(5))}


async def test_http_while_the_database_is_away(postgres: PostgresServer) -> None:
    """/score answers 200, /feedback 503 with Retry-After (never 500); both recover."""
    settings = _settings(postgres.new_database(), db_timeout_s=2.0, db_score_buffer=2)
    async with serve(settings) as client:
        assert (await client.post("/score", json=question("q0", 0.9))).status_code == 200
        with database_down(postgres):
            for i in range(1, 4):  # q1, q2 queue; q3 finds the queue full
                r = await client.post("/score", json=question(f"q{i}", 0.8))
                assert r.status_code == 200, r.text
            r = await client.post("/feedback", json={"id": "q0", "correct": True})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert "unavailable" in r.json()["detail"]
            metrics = gauges((await client.get("/metrics")).text)
            assert metrics[("ufcal_store_up", frozenset())] == 0
            assert metrics[("ufcal_store_scores_dropped_total", frozenset())] == 1
        for _ in range(100):
            r = await client.post("/feedback", json={"id": "q1", "correct": True})
            if r.status_code not in (503, 404):  # 404: q1 is still queued
                break
            await asyncio.sleep(0.1)
        assert r.status_code == 201, r.text
        assert (
            await client.post("/feedback", json={"id": "q0", "correct": True})
        ).status_code == 201
        metrics = gauges((await client.get("/metrics")).text)
        assert metrics[("ufcal_store_up", frozenset())] == 1


# ---------------------------------------------------------------- ufcal db upgrade


def _db_upgrade(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UFCAL_DB")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "db", "upgrade"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ufcal_db_upgrade_migrates_and_names_the_host_when_it_cannot(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    done = _db_upgrade({"UFCAL_DB_URL": postgres.new_database()})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == head_revision()
    legacy = _db_upgrade({"UFCAL_DB_PATH": str(tmp_path / "u.db")})
    assert legacy.returncode == 0 and "sqlite file" in json.loads(legacy.stdout)["database"]
    refused = _db_upgrade({"UFCAL_DB_URL": postgres.url(password="not-the-password")})
    assert refused.returncode == 1 and refused.stdout == ""
    assert "127.0.0.1" in refused.stderr and "not-the-password" not in refused.stderr


# ---------------------------------------------------------------- rows the database refuses


async def test_a_row_the_database_refuses_is_dropped_alone(postgres: PostgresServer) -> None:
    """PostgreSQL text cannot hold NUL: such an id is never queued (its feedback is 404),
    its question text is kept with U+FFFD, and should a refused row reach the writer anyway
    it is dropped and counted while the rest of its batch is written."""
    url = postgres.new_database()
    store = await Store.open(url, keep_text=True)
    try:
        await store.save_score(_score("nul\x00id"))
        with pytest.raises(UnknownScore):
            await store.add_feedback("nul\x00id", correct=True)
        text = ScoreRecord(
            "texty", "m", "uf", "logprobs", 0, 0.5, 0.5, 2, 0.0, "a\x00b", ["x", "y"]
        )
        await store.save_score(text)
        store.backend.storable = lambda key: True  # type: ignore[method-assign]
        await asyncio.gather(*(store.save_score(_score(i)) for i in ("ok1", "bad\x00", "ok2")))
        assert store.dropped_scores == 1 and store.up
    finally:
        await store.close()
    rows = dict(await fetch(url, "SELECT id, question FROM scores"))
    assert set(rows) == {"texty", "ok1", "ok2"} and rows["texty"] == "a\ufffdb"


async def test_an_in_memory_sqlite_store_keeps_its_rows_while_open() -> None:
    store = await Store.open(":memory:")
    try:
        await store.save_score(_score("m"))
        assert (await store.add_feedback("m", correct=True)).correct
        assert store.calibration().n == 1
    finally:
        await store.close()


# ---------------------------------------------------------------- calibrators (issue 10)


def _calibrator(version: int = 0, status: str = "active") -> CalibratorRecord:
    return CalibratorRecord(
        "m", "uf", "logprobs", version, "platt", {"a": 1.0, "b": 0.0}, 100, 60, 40,
        {"first": 1.0}, {"ece": 0.05}, time.time(), status,
    )  # fmt: skip


async def test_calibrators_versions_and_labelled_window(db: str) -> None:
    async with replicas(db, n=1) as (store,):
        first = await store.save_calibrator(_calibrator())
        second = await store.save_calibrator(_calibrator())
        rejected = await store.save_calibrator(_calibrator(status="rejected"))
        assert (first.version, second.version, rejected.version) == (1, 2, 3)
        versions = await store.calibrator_versions()
        assert [(c.version, c.status) for c in versions] == [
            (1, "retired"), (2, "active"), (3, "rejected"),
        ]  # fmt: skip
        assert [c.version for c in await store.active_calibrators()] == [2]
        assert versions[1].params == {"a": 1.0, "b": 0.0} and versions[1].metrics["ece"] == 0.05
        raw = ScoreRecord("w1", "m", "uf", "logprobs", 0, 0.9, 0.1, 4, 0.0, raw_confidence=0.7)
        await store.save_score(raw)
        await store.save_score(_score("w2", 0.4))
        await store.add_feedback("w1", correct=True, source="key-hash")
        await store.add_feedback("w2", correct=False)
        window = await store.labelled_window(("m", "uf", "logprobs", "multiple_choice"), 10)
        assert [(r.raw_confidence, r.correct, r.source) for r in window] == [
            (0.7, True, "key-hash"), (0.4, False, None),
        ]  # fmt: skip
        assert await store.label_counts() == {("m", "uf", "logprobs", "multiple_choice"): 2}
        assert store.raw_calibration().n == 2
        assert store.calibration().bins != store.raw_calibration().bins


async def test_feedback_right_after_an_unawaited_score_finds_it(new_db: Callable[[], str]) -> None:
    """/score does not wait for the commit of an id the service made up; feedback sent at
    once, to the same replica or (PostgreSQL) to another, still finds the score."""
    url = new_db()
    async with replicas(url) as (a, b):
        await a.save_score(_score("fresh1"), wait=False)
        assert (await a.add_feedback("fresh1", correct=True)).correct
        if a.backend.shared:
            await a.save_score(_score("fresh2"), wait=False)
            assert (await b.add_feedback("fresh2", correct=False)).correct is False
        with pytest.raises(UnknownScore):
            await b.add_feedback("never-scored", correct=True)
