"""``POST /feedback``, ``GET /calibration`` and the score store, over the fake engine in
process (httpx's ASGI transport, lifespan run)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from service.calibration.metrics import calibration_report
from service.config import Settings
from service.store import ScoreConflict, ScoreRecord, Store, StoreUnavailable, live_calibration
from service.store.backends import backend_for
from service.telemetry import bin_label
from tests.fake_app import build_app

METRICS = ("accuracy", "ece", "ipr", "ce", "brier", "auroc")
# p of each question (the fake model's P(A)) and whether A is right.
DATA = [
    (0.99, True),
    (0.97, True),
    (0.95, False),
    (0.9, True),
    (0.85, True),
    (0.8, False),
    (0.7, True),
    (0.6, False),
    (0.55, True),
    (0.5, False),
    (0.35, False),
    (0.1, True),
]


def _settings(db: str | Path, **kwargs: Any) -> Settings:
    """Settings on ``db``: a SQLite path or a database URL."""
    if isinstance(db, str) and "://" in db:
        kwargs["db_url"] = db
    else:
        kwargs["db_path"] = Path(db)
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


async def fetch(db: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the store's database, whichever backend."""
    engine = backend_for(db).create_engine()
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in (await conn.exec_driver_sql(sql)).all()]
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the fake engine, lifespan running, ready."""
    app = build_app(settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ufcal.test") as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            yield client


def question(qid: str, p: float, n_options: int = 4) -> dict[str, Any]:
    options = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"][:n_options]
    return {"id": qid, "question": f"Which one? p={p}", "options": options}


async def score(client: httpx.AsyncClient, qid: str, p: float, n: int = 4) -> dict[str, Any]:
    r = await client.post("/score", json=question(qid, p, n))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


MC = ("task", "multiple_choice")
RETURNED = frozenset({("confidence", "returned"), MC})


def gauges(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def assert_matches_report(body: dict[str, Any], confs: list[float], corr: list[bool]) -> None:
    """/calibration equals calibration_report on the same data, bins included."""
    expected = calibration_report(confs, corr, body["n_bins"])
    assert body["n"] == expected.n == len(confs)
    for name in METRICS:
        want = getattr(expected, name)
        assert body[name] == (None if want is None else pytest.approx(want, abs=1e-12)), name
    assert len(body["bins"]) == len(expected.bins)
    for got, want in zip(body["bins"], expected.bins, strict=True):
        assert got["lower"] == pytest.approx(want.lower)
        assert got["upper"] == pytest.approx(want.upper)
        assert got["count"] == want.count
        assert got["accuracy"] == (None if want.accuracy is None else pytest.approx(want.accuracy))
        assert got["confidence"] == (
            None if want.confidence is None else pytest.approx(want.confidence)
        )


# ---------------------------------------------------------------- /feedback


async def test_feedback_correct_and_gold_index(db: str) -> None:
    async with serve(_settings(db)) as client:
        a = await score(client, "a", 0.9)
        b = await score(client, "b", 0.8)
        c = await score(client, "c", 0.7)
        assert a["answer"]["index"] == 0
        r = await client.post("/feedback", json={"id": "a", "correct": True})
        assert r.status_code == 201, r.text
        assert r.json() == {
            "id": "a",
            "correct": True,
            "gold_index": None,
            "answer_index": 0,
            "confidence": a["confidence"],
            "window_size": 1,
            "task": "multiple_choice",
        }
        r = await client.post("/feedback", json={"id": "b", "gold_index": 0})
        assert r.status_code == 201
        assert r.json()["correct"] is True and r.json()["gold_index"] == 0
        r = await client.post("/feedback", json={"id": "c", "gold_index": 3})
        assert r.status_code == 201
        assert r.json()["correct"] is False and r.json()["window_size"] == 3
        cal = (await client.get("/calibration")).json()
        metrics = gauges((await client.get("/metrics")).text)
    assert_matches_report(
        cal, [a["confidence"], b["confidence"], c["confidence"]], [True, True, False]
    )
    assert metrics[("ufcal_feedback_total", frozenset({("outcome", "correct")}))] == 2.0
    assert metrics[("ufcal_feedback_total", frozenset({("outcome", "wrong")}))] == 1.0


async def test_unknown_id_is_404(db: str) -> None:
    async with serve(_settings(db)) as client:
        r = await client.post("/feedback", json={"id": "never-scored", "correct": True})
        assert r.status_code == 404
        assert "never-scored" in r.json()["detail"]
        assert (await client.get("/calibration")).json()["n"] == 0


async def test_second_feedback_is_409_and_keeps_the_first(db: str) -> None:
    async with serve(_settings(db)) as client:
        await score(client, "x", 0.9)
        assert (
            await client.post("/feedback", json={"id": "x", "correct": True})
        ).status_code == 201
        for again in ({"id": "x", "correct": False}, {"id": "x", "correct": True}):
            r = await client.post("/feedback", json=again)
            assert r.status_code == 409
            assert "already has feedback" in r.json()["detail"]
        cal = (await client.get("/calibration")).json()
    assert cal["n"] == 1 and cal["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "q", "gold_index": 4}, "gold_index"),  # the question had 4 options
        ({"id": "q", "gold_index": 99}, "gold_index"),
        ({"id": "q", "gold_index": -1}, "gold_index"),
        ({"id": "q", "gold_index": 1.5}, "gold_index"),
        ({"id": "q", "gold_index": "2"}, "gold_index"),
        ({"id": "q", "correct": "yes"}, "correct"),
        ({"id": "q", "correct": 1}, "correct"),
        ({"id": "", "correct": True}, "id"),
        ({"correct": True}, "id"),
        ({"id": "q", "correct": True, "note": "x"}, "note"),
    ],
)
async def test_bad_feedback_is_422_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    async with serve(_settings(tmp_path / "u.db")) as client:
        await score(client, "q", 0.9, n=4)
        r = await client.post("/feedback", json=body)
        assert r.status_code == 422, r.text
        issues = r.json()["detail"]
        assert field in {str(i["loc"][1]) for i in issues if len(i["loc"]) > 1}
        # nothing was recorded: a valid feedback still goes through
        ok = await client.post("/feedback", json={"id": "q", "gold_index": 3})
        assert ok.status_code == 201


@pytest.mark.parametrize(
    "body",
    [{"id": "q"}, {"id": "q", "correct": True, "gold_index": 0}, {"id": "q", "correct": None}],
)
async def test_exactly_one_of_correct_and_gold_index(tmp_path: Path, body: dict[str, Any]) -> None:
    async with serve(_settings(tmp_path / "u.db")) as client:
        await score(client, "q", 0.9)
        r = await client.post("/feedback", json=body)
    assert r.status_code == 422
    assert "exactly one of 'correct' and 'gold_index'" in json.dumps(r.json())
    field = "gold_index" if "gold_index" in body else "correct"  # both given: the second
    assert r.json()["detail"][0]["loc"] == ["body", field]


async def test_gold_index_range_follows_the_question(db: str) -> None:
    async with serve(_settings(db)) as client:
        await score(client, "two", 0.9, n=2)
        await score(client, "six", 0.9, n=6)
        r = await client.post("/feedback", json={"id": "two", "gold_index": 2})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "gold_index"]
        assert "2 options" in r.json()["detail"][0]["msg"]
        assert (
            await client.post("/feedback", json={"id": "six", "gold_index": 5})
        ).status_code == 201


# ---------------------------------------------------------------- /calibration


async def test_calibration_empty_is_nulls(db: str) -> None:
    async with serve(_settings(db, calibration_bins=5)) as client:
        r = await client.get("/calibration")
        metrics = gauges((await client.get("/metrics")).text)
    assert r.status_code == 200
    body = r.json()
    assert body["n"] == 0 and body["window"] == 1000 and body["n_bins"] == 5
    assert all(body[m] is None for m in METRICS)
    assert [b["count"] for b in body["bins"]] == [0] * 5
    assert all(b["accuracy"] is None and b["confidence"] is None for b in body["bins"])
    assert metrics[("ufcal_live_window_size", RETURNED)] == 0.0


async def test_calibration_equals_calibration_report(db: str) -> None:
    confs, corr = [], []
    async with serve(_settings(db)) as client:
        for i, (p, right) in enumerate(DATA):
            body = await score(client, f"q{i}", p)
            confs.append(body["confidence"])
            gold = body["answer"]["index"] if right else (body["answer"]["index"] + 1) % 4
            r = await client.post("/feedback", json={"id": f"q{i}", "gold_index": gold})
            assert r.status_code == 201
            corr.append(right)
        cal = (await client.get("/calibration")).json()
        metrics = gauges((await client.get("/metrics")).text)
    assert len(set(confs)) == len(DATA), "the fake model gives each question its own confidence"
    assert_matches_report(cal, confs, corr)
    # the Prometheus gauges carry the same numbers
    for name in ("accuracy", "ece", "ipr", "ce", "brier"):
        assert metrics[(f"ufcal_live_{name}", RETURNED)] == pytest.approx(cal[name]), name
    assert metrics[("ufcal_live_window_size", RETURNED)] == len(DATA)
    for b in cal["bins"]:
        label = frozenset({("confidence", "returned"), MC, ("bin", bin_label(b["upper"]))})
        assert metrics[("ufcal_live_bin_count", label)] == b["count"]
        if b["count"]:
            assert metrics[("ufcal_live_bin_accuracy", label)] == pytest.approx(b["accuracy"])
            assert metrics[("ufcal_live_bin_confidence", label)] == pytest.approx(b["confidence"])
        else:
            assert ("ufcal_live_bin_accuracy", label) not in metrics


async def test_window_keeps_the_last_feedbacks(db: str) -> None:
    settings = _settings(db, calibration_window=4)
    confs, corr = [], []
    async with serve(settings) as client:
        for i, (p, right) in enumerate(DATA[:7]):
            confs.append((await score(client, f"w{i}", p))["confidence"])
            corr.append(right)
        # feedback in another order than the scores: the window follows the feedback
        order = [6, 0, 5, 1, 4, 2, 3]
        for i in order:
            r = await client.post("/feedback", json={"id": f"w{i}", "correct": corr[i]})
            assert r.status_code == 201
            assert r.json()["window_size"] == min(order.index(i) + 1, 4)
        cal = (await client.get("/calibration")).json()
    last = order[-4:]
    assert cal["window"] == 4
    assert_matches_report(cal, [confs[i] for i in last], [corr[i] for i in last])


# ---------------------------------------------------------------- re-used ids, restarts


async def test_rescoring_an_id_replaces_it_until_it_has_feedback(db: str) -> None:
    async with serve(_settings(db)) as client:
        first = await score(client, "same", 0.9)
        second = await score(client, "same", 0.1)  # no feedback yet: replaces the first
        assert first["answer"]["index"] == 0 and second["answer"]["index"] == 1
        r = await client.post("/feedback", json={"id": "same", "gold_index": 1})
        assert r.status_code == 201
        assert r.json()["correct"] is True
        assert r.json()["confidence"] == second["confidence"]
        # with feedback recorded, the id is taken: 409, and the stored score stays
        r = await client.post("/score", json=question("same", 0.5))
        assert r.status_code == 409
        assert "already has feedback" in r.json()["detail"]
        metrics = gauges((await client.get("/metrics")).text)
        cal = (await client.get("/calibration")).json()
    assert cal["n"] == 1
    assert cal["bins"][int(second["confidence"] * 10)]["confidence"] == pytest.approx(
        second["confidence"]
    )
    key = ("ufcal_requests_total", frozenset({("method", "uf"), ("mode", "logprobs")}))
    statuses = {
        dict(labels)["status"]: v
        for (name, labels), v in metrics.items()
        if name == key[0] and dict(labels).get("method") == "uf"
    }
    assert statuses == {"200": 2.0, "409": 1.0}


async def test_feedback_survives_a_restart(db: str) -> None:
    confs = []
    async with serve(_settings(db)) as client:
        for i, (p, right) in enumerate(DATA[:6]):
            confs.append((await score(client, f"r{i}", p))["confidence"])
            await client.post("/feedback", json={"id": f"r{i}", "correct": right})
        await score(client, "pending", 0.9)
        before = (await client.get("/calibration")).json()
    async with serve(_settings(db)) as client:
        after = (await client.get("/calibration")).json()
        metrics = gauges((await client.get("/metrics")).text)
        assert (
            await client.post("/feedback", json={"id": "r0", "correct": True})
        ).status_code == 409
        r = await client.post("/feedback", json={"id": "pending", "correct": False})
        assert r.status_code == 201 and r.json()["window_size"] == 7
    assert after == before
    assert_matches_report(after, confs, [right for _, right in DATA[:6]])
    assert metrics[("ufcal_live_ece", RETURNED)] == pytest.approx(before["ece"])
    assert metrics[("ufcal_live_window_size", RETURNED)] == 6


async def test_question_text_is_stored_only_with_log_text(new_db: Callable[[], str]) -> None:
    for log_text in (False, True):
        db = new_db()
        async with serve(_settings(db, log_text=log_text)) as client:
            await score(client, "t", 0.9)
        (row,) = await fetch(
            db,
            "SELECT model, method, mode, answer_index, confidence, uncertainty, n_options, "
            "question, options, created_at FROM scores WHERE id = 't'",
        )
        assert row[:4] == ("fake-model", "uf", "logprobs", 0)
        assert 0 < row[4] < 1 and 0 < row[5] < 1 and row[6] == 4 and row[9] > 0
        if log_text:
            assert row[7] == "Which one? p=0.9"
            assert json.loads(row[8]) == ["alpha", "beta", "gamma", "delta"]
        else:
            assert row[7] is None and row[8] is None


async def test_concurrent_scores_and_feedback(db: str) -> None:
    async with serve(_settings(db)) as client:
        scored = await asyncio.gather(*(score(client, f"c{i}", 0.5 + i / 100) for i in range(40)))
        replies = await asyncio.gather(
            *(
                client.post("/feedback", json={"id": f"c{i}", "correct": i % 3 == 0})
                for i in range(40)
            ),
            client.post("/feedback", json={"id": "c0", "correct": True}),
        )
        cal = (await client.get("/calibration")).json()
    codes = sorted(r.status_code for r in replies)
    assert codes == [201] * 40 + [409]
    assert cal["n"] == 40
    # feedback committed together (one fsync for the group) may report the same window size
    sizes = [r.json()["window_size"] for r in replies if r.status_code == 201]
    assert max(sizes) == 40 and min(sizes) >= 1
    # the window holds all 40 (in commit order; the metrics do not depend on the order)
    assert_matches_report(cal, [s["confidence"] for s in scored], [i % 3 == 0 for i in range(40)])


async def test_openapi_documents_feedback_and_calibration(db: str) -> None:
    async with serve(_settings(db)) as client:
        spec = (await client.get("/openapi.json")).json()
    assert {"/feedback", "/calibration"} <= set(spec["paths"])
    post = spec["paths"]["/feedback"]["post"]
    assert {"201", "404", "409", "422"} <= set(post["responses"])
    schemas = spec["components"]["schemas"]
    assert {"FeedbackRequest", "FeedbackResponse", "CalibrationResponse"} <= set(schemas)
    assert {"n", "ece", "ipr", "ce", "brier", "bins"} <= set(
        schemas["CalibrationResponse"]["properties"]
    )


# ---------------------------------------------------------------- the store itself


async def test_store_is_wal_and_refuses_work_after_close(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db", window=10, n_bins=10)
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.add_feedback("x", correct=True)
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.save_score(_score("x"))


async def test_store_open_fails_loudly_on_a_bad_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        await Store.open(blocker / "sub" / "u.db")


def test_live_calibration_empty_and_full() -> None:
    empty = live_calibration([], [], window=5, n_bins=4)
    assert empty.n == 0 and empty.ece is None and empty.auroc is None
    assert [(b.lower, b.upper, b.count) for b in empty.bins] == [
        (0.0, 0.25, 0),
        (0.25, 0.5, 0),
        (0.5, 0.75, 0),
        (0.75, 1.0, 0),
    ]
    full = live_calibration([0.2, 0.9], [False, True], window=5, n_bins=4)
    want = calibration_report([0.2, 0.9], [False, True], 4)
    assert full.ece == want.ece and full.bins == want.bins and full.auroc == want.auroc


async def test_feedback_commits_wait_for_the_disk_and_scores_do_not(db: str) -> None:
    """SQLite: synchronous=FULL (WAL fsynced at commit) for feedback, NORMAL for scores;
    PostgreSQL: synchronous_commit on for feedback, off for scores."""
    store = await Store.open(db)
    show = "PRAGMA synchronous" if store.backend.name == "sqlite" else "SHOW synchronous_commit"
    seen: list[tuple[str, str]] = []
    for kind in ("scores", "feedback"):
        original = getattr(store.backend, f"prepare_{kind}")

        async def spy(conn: Any, original: Any = original, kind: str = kind) -> None:
            await original(conn)
            seen.append((kind, str((await conn.exec_driver_sql(show)).scalar())))

        setattr(store.backend, f"prepare_{kind}", spy)
    try:
        await store.save_score(ScoreRecord("a", "m", "uf", "logprobs", 0, 0.7, 0.3, 4, 0.0))
        await store.add_feedback("a", correct=True)
        await store.save_score(ScoreRecord("b", "m", "uf", "logprobs", 1, 0.4, 0.6, 4, 0.0))
    finally:
        await store.close()
    lazy, durable = ("1", "2") if store.backend.name == "sqlite" else ("off", "on")
    assert seen == [("scores", lazy), ("feedback", durable), ("scores", lazy)]


def _score(score_id: str, confidence: float = 0.5) -> ScoreRecord:
    return ScoreRecord(score_id, "m", "uf", "logprobs", 0, confidence, 0.5, 4, 0.0)


async def test_scores_saved_together_are_one_batch_and_conflicts_stay_per_score(db: str) -> None:
    """Scores saved in one loop turn are written in one transaction; an id that already has
    feedback is refused alone, the others are stored (a repeated id: the last one wins)."""
    batches: list[int] = []
    store = await Store.open(db)
    original = store._write_scores

    async def spy(records: Any, **kwargs: Any) -> set[str]:
        batches.append(len(records))
        return await original(records, **kwargs)

    store._write_scores = spy  # type: ignore[method-assign]
    try:
        await store.save_score(_score("judged"))
        await store.add_feedback("judged", correct=True)
        batches.clear()
        outcomes = await asyncio.gather(
            *(store.save_score(_score(f"q{i}")) for i in range(50)),
            store.save_score(_score("judged", 0.9)),
            store.save_score(_score("q7", 0.25)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert batches == [52]
    assert outcomes[:50] == [None] * 50 and outcomes[51] is None
    assert isinstance(outcomes[50], ScoreConflict)
    rows = dict(await fetch(db, "SELECT id, confidence FROM scores"))
    assert len(rows) == 51 and rows["judged"] == 0.5 and rows["q7"] == 0.25


async def test_scores_pending_at_close_are_written(db: str) -> None:
    store = await Store.open(db)
    saving = [asyncio.ensure_future(store.save_score(_score(f"q{i}"))) for i in range(5)]
    await asyncio.sleep(0)  # the saves are queued, not yet written
    await store.close()
    assert [s.result() for s in saving] == [None] * 5
    assert await fetch(db, "SELECT COUNT(*) FROM scores") == [(5,)]
