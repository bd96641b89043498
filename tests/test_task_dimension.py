"""Calibration stays honest per task (issue 21 item 5): free-form and multiple-choice scores
never share a live window, a calibrator, a label count or a metric series; feedback on a
free-form score says whether the returned answer was right; old databases and calibrator
files keep working as multiple-choice ones."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command

from service.calibration.recalibrate import Calibrator, apply
from service.recalibration import (
    CalibratorFileError,
    RecalibrationConfig,
    Recalibrator,
    load_calibrator_file,
    write_calibrator_file,
)
from service.store import CalibratorRecord, ScoreRecord, Store
from service.store.backends import backend_for
from service.store.migrate import alembic_config, head_revision
from service.telemetry import Telemetry
from tests.test_api import GOOD, serve, white_box
from tests.test_feedback import _settings, fetch, gauges
from tests.test_score_freeform import FREE, paris_model

MC_KEY = ("fake-model", "uf", "logprobs", "multiple_choice")
FF_KEY = ("fake-model", "uf", "logprobs", "free_form")
MC_PLATT = {"a": 0.5, "b": -1.0}
FF_PLATT = {"a": 2.0, "b": 0.5}


def _entry(**overrides: Any) -> dict[str, Any]:
    entry = {
        "model": "fake-model",
        "method": "uf",
        "mode": "logprobs",
        "kind": "platt",
        "params": MC_PLATT,
        "labels": 300,
    }
    entry.update(overrides)
    return entry


def _file(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"calibrators": list(entries)}))
    return path


async def _label(client: httpx.AsyncClient, body: dict[str, Any], qid: str, **truth: Any) -> Any:
    scored = await client.post("/score", json={**body, "id": qid})
    assert scored.status_code == 200, scored.text
    r = await client.post("/feedback", json={"id": qid, **truth})
    assert r.status_code == 201, r.text
    return scored.json(), r.json()


def _score(score_id: str, task: str, raw: float = 0.7) -> ScoreRecord:
    return ScoreRecord(
        score_id,
        *MC_KEY[:3],
        0,
        raw,
        0.3,
        4,
        time.time(),
        task=task,  # type: ignore[arg-type]
    )


def _calibrator(key: tuple[str, ...], params: dict[str, float]) -> CalibratorRecord:
    model, method, mode, task = key
    return CalibratorRecord(
        model=model,
        method=method,
        mode=mode,
        task=task,  # type: ignore[arg-type]
        version=0,
        kind="platt",
        params=params,
        labels=1,
        positives=1,
        negatives=0,
        window={},
        metrics={},
        fitted_at=time.time(),
        status="active",
    )


# ---------------------------------------------------------------- through the API


async def test_free_form_and_multiple_choice_labels_do_not_mix(db: str) -> None:
    """Each task has its live window in /calibration and its own ufcal_live_* series; a
    restart reloads both windows apart."""
    settings = _settings(db)
    async with serve(paris_model().engine(), settings) as client:
        ff_score, ff = await _label(client, FREE, "ff-1", correct=False)
        await _label(client, FREE, "ff-2", correct=True)
        ff_window = (await client.get("/calibration", params={"task": "free_form"})).json()
        mc_window = (await client.get("/calibration")).json()
    assert ff["task"] == "free_form" and ff["correct"] is False and ff["window_size"] == 1
    assert ff["confidence"] == pytest.approx(ff_score["confidence"])
    assert ff_window["task"] == "free_form" and ff_window["n"] == 2
    assert ff_window["accuracy"] == pytest.approx(0.5)
    assert mc_window["task"] == "multiple_choice" and mc_window["n"] == 0

    async with serve(white_box(), settings) as client:
        _, mc = await _label(client, GOOD, "mc-1", gold_index=3)
        mc_window = (await client.get("/calibration")).json()
        ff_window = (await client.get("/calibration?task=free_form")).json()
        metrics = gauges((await client.get("/metrics")).text)
        bad = await client.get("/calibration?task=essay")
    assert mc["task"] == "multiple_choice" and mc["correct"] is True and mc["window_size"] == 1
    assert mc_window["n"] == 1 and mc_window["accuracy"] == 1.0
    assert ff_window["n"] == 2 and ff_window["accuracy"] == pytest.approx(0.5)  # reloaded
    size = "ufcal_live_window_size"
    for task, n in (("multiple_choice", 1), ("free_form", 2)):
        for confidence in ("returned", "raw"):
            labels = frozenset({("confidence", confidence), ("task", task)})
            assert metrics[(size, labels)] == n
    mc_returned = frozenset({("confidence", "returned"), ("task", "multiple_choice")})
    assert metrics[("ufcal_live_accuracy", mc_returned)] == 1.0
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "task"]
    rows = await fetch(db, "SELECT id, task FROM scores ORDER BY id")
    assert rows == [("ff-1", "free_form"), ("ff-2", "free_form"), ("mc-1", "multiple_choice")]


async def test_recent_scores_say_their_task(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "u.db")
    async with serve(paris_model().engine(), settings) as client:
        await client.post("/score", json={**FREE, "id": "ff"})
        recent = (await client.get("/scores")).json()["scores"]
    assert [(s["id"], s["task"]) for s in recent] == [("ff", "free_form")]


async def test_a_free_form_score_is_recalibrated_only_by_a_free_form_calibrator(
    tmp_path: Path,
) -> None:
    """An old (task-less) file calibrates multiple-choice scores and leaves free-form ones
    raw; a free_form entry of the same (model, method, mode) calibrates only free-form."""
    old = _file(tmp_path / "old.json", _entry())
    settings = _settings(tmp_path / "u.db", calibrators=str(old))
    async with serve(paris_model().engine(), settings) as client:
        ff = (await client.post("/score", json={**FREE, "answer": "Rome"})).json()
    assert ff["calibrator"] is None and ff["confidence"] == ff["raw_confidence"]
    assert ff["given"]["confidence"] == ff["given"]["raw_confidence"]

    both = _file(
        tmp_path / "both.json",
        _entry(),
        _entry(task="free_form", params=FF_PLATT, labels=120),
    )
    settings = _settings(tmp_path / "u2.db", calibrators=str(both))
    async with serve(paris_model().engine(), settings) as client:
        ff = (await client.post("/score", json={**FREE, "answer": "Rome"})).json()
        versions = (await client.get("/calibrators")).json()["calibrators"]
        metrics = gauges((await client.get("/metrics")).text)
    async with serve(white_box(), settings) as client:
        mc = (await client.post("/score", json=GOOD)).json()
    ff_map, mc_map = Calibrator("platt", FF_PLATT), Calibrator("platt", MC_PLATT)
    assert ff["calibrator"] == {"version": 1, "kind": "platt", "labels": 120}
    assert ff["confidence"] == pytest.approx(apply(ff_map, ff["raw_confidence"]))
    assert ff["given"]["confidence"] == pytest.approx(apply(ff_map, ff["given"]["raw_confidence"]))
    for g in ff["groups"]:
        assert g["confidence"] == pytest.approx(apply(ff_map, g["raw_confidence"]))
    assert mc["calibrator"] == {"version": 1, "kind": "platt", "labels": 300}
    assert mc["confidence"] == pytest.approx(apply(mc_map, mc["raw_confidence"]))
    assert sorted((v["task"], v["version"], v["labels"]) for v in versions) == [
        ("free_form", 1, 120),
        ("multiple_choice", 1, 300),
    ]
    for key, labels in ((MC_KEY, 300), (FF_KEY, 120)):
        names = frozenset(zip(("model", "method", "mode", "task"), key, strict=True))
        assert metrics[("ufcal_calibrator_labels", names)] == labels


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "ff"}, "correct"),
        ({"id": "ff", "correct": None}, "correct"),
        ({"id": "ff", "correct": True, "gold_index": 0}, "gold_index"),
        ({"id": "ff", "correct": "yes"}, "correct"),
        ({"id": "ff", "gold_index": -1}, "gold_index"),
    ],
)
async def test_bad_free_form_feedback_is_422_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    async with serve(paris_model().engine(), _settings(tmp_path / "u.db")) as client:
        await client.post("/score", json={**FREE, "id": "ff"})
        r = await client.post("/feedback", json=body)
        assert r.status_code == 422, r.text
        assert ["body", field] in [i["loc"] for i in r.json()["detail"]]
        ok = await client.post("/feedback", json={"id": "ff", "correct": True})
    assert ok.status_code == 201 and ok.json()["task"] == "free_form"


async def test_correct_judges_the_given_free_form_answer(tmp_path: Path) -> None:
    """``correct`` is about the returned answer: the given one when there is one."""
    async with serve(paris_model().engine(), _settings(tmp_path / "u.db")) as client:
        scored, r = await _label(client, {**FREE, "answer": "Rome"}, "ff", correct=True)
        window = (await client.get("/calibration?task=free_form")).json()
    assert r["answer_index"] == scored["given"]["index"] == 1  # Rome, not the model's Paris
    assert r["confidence"] == pytest.approx(scored["given"]["confidence"])
    assert r["correct"] is True
    assert window["n"] == 1 and window["accuracy"] == 1.0
    assert window["returned"]["bins"] == window["bins"]


# ---------------------------------------------------------------- the store and the refits


async def test_the_store_keeps_the_tasks_apart(db: str) -> None:
    """Label windows, counts and version numbers are per (model, method, mode, task)."""
    store = await Store.open(db)
    try:
        for i in range(3):
            await store.save_score(_score(f"mc{i}", "multiple_choice", 0.9))
            await store.add_feedback(f"mc{i}", correct=True)
        await store.save_score(_score("ff0", "free_form", 0.2))
        await store.add_feedback("ff0", correct=False)
        mc_saved = await store.save_calibrator(_calibrator(MC_KEY, MC_PLATT))
        ff_saved = await store.save_calibrator(_calibrator(FF_KEY, FF_PLATT))
        assert (mc_saved.version, ff_saved.version) == (1, 1)  # numbered per task
        assert (await store.labelled_window(FF_KEY, 10))[0].raw_confidence == 0.2
        assert len(await store.labelled_window(MC_KEY, 10)) == 3
        assert await store.label_counts() == {MC_KEY: 3, FF_KEY: 1}
        assert store.calibration().n == 3 and store.calibration().accuracy == 1.0
        assert store.calibration("free_form").n == 1
        assert store.raw_calibration("free_form").accuracy == 0.0
        active = {c.key: c.params for c in await store.active_calibrators()}
        assert active == {MC_KEY: MC_PLATT, FF_KEY: FF_PLATT}
        recent = {s.score.id: s.score.task for s in await store.recent_scores(10)}
        assert recent["ff0"] == "free_form" and recent["mc0"] == "multiple_choice"
    finally:
        await store.close()
    reopened = await Store.open(db)  # the windows load apart
    try:
        assert reopened.calibration().n == 3 and reopened.calibration("free_form").n == 1
        assert await reopened.refresh()
        assert reopened.calibration("free_form").n == 1
    finally:
        await reopened.close()


async def test_a_refit_learns_only_from_its_own_tasks_labels(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    store = await Store.open(tmp_path / "r.db")
    try:
        for i, raw in enumerate(rng.uniform(0.05, 0.95, 60)):
            await store.save_score(_score(f"ff{i}", "free_form", float(raw)))
            await store.add_feedback(f"ff{i}", correct=bool(rng.uniform() < raw / 2))
            await store.save_score(_score(f"mc{i}", "multiple_choice", float(raw)))
            await store.add_feedback(f"mc{i}", correct=True)
        config = RecalibrationConfig(online=True, every=1000, min_labels=40, min_class=8)
        recal = Recalibrator(store, Telemetry(), config)
        await recal.start()
        try:
            assert await recal.refit(FF_KEY) == "promoted"
        finally:
            await recal.close()
        (fitted,) = await store.calibrator_versions()
        assert fitted.key == FF_KEY and fitted.labels == 60
        assert 0 < fitted.positives < 60  # the all-right multiple-choice labels stayed out
        assert recal.active(FF_KEY) is not None and recal.active(MC_KEY) is None
    finally:
        await store.close()


def test_old_calibrator_files_load_as_multiple_choice(tmp_path: Path) -> None:
    old = _file(tmp_path / "old.json", _entry())
    (record,) = load_calibrator_file(old)
    assert record.task == "multiple_choice" and record.key == MC_KEY
    both = _file(tmp_path / "both.json", _entry(), _entry(task="free_form"))
    assert {r.key for r in load_calibrator_file(both)} == {MC_KEY, FF_KEY}
    out = tmp_path / "out.json"
    write_calibrator_file(out, load_calibrator_file(both))
    assert [e["task"] for e in json.loads(out.read_text())["calibrators"]] == [
        "multiple_choice",
        "free_form",
    ]
    assert load_calibrator_file(out) == load_calibrator_file(both)
    with pytest.raises(CalibratorFileError, match=r"calibrators\[0\]: unknown task 'essay'"):
        load_calibrator_file(_file(tmp_path / "bad.json", _entry(task="essay")))
    twice = _file(tmp_path / "twice.json", _entry(task="free_form"), _entry(task="free_form"))
    with pytest.raises(CalibratorFileError, match="a second calibrator"):
        load_calibrator_file(twice)


def test_ufcal_calibrate_fits_one_calibrator_per_task(tmp_path: Path) -> None:
    import argparse

    from service.evaluation.calibrate import calibrate_command

    rows = []
    for i in range(200):
        raw = 0.05 + 0.9 * (i % 50) / 49
        rows.append({"model": "m", "method": "uf", "mode": "logprobs", "confidence": raw,
                     "correct": i % 3 == 0})  # fmt: skip
        rows.append({"model": "m", "method": "uf", "mode": "logprobs", "confidence": raw,
                     "correct": i % 2 == 0, "task": "free_form"})  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cal.json"
    args = argparse.Namespace(
        results=str(results), out=str(out), method=None, min_labels=20, min_class=5
    )
    assert calibrate_command(args) == 0
    records = load_calibrator_file(out)
    assert sorted(r.task for r in records) == ["free_form", "multiple_choice"]
    assert all(r.labels == 200 for r in records)
    results.write_text(json.dumps({**rows[1], "task": "essay"}) + "\n")
    assert calibrate_command(args) == 2


# ---------------------------------------------------------------- the migration


async def _at_revision(db: str, revision: str) -> None:
    """Bring an empty database to ``revision`` (as an older ufcal left it)."""
    engine = backend_for(db).create_engine()
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), revision))
    finally:
        await engine.dispose()


async def _execute(db: str, *statements: str) -> None:
    engine = backend_for(db).create_engine()
    try:
        async with engine.begin() as conn:
            for sql in statements:
                await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


async def test_a_database_at_revision_0001_upgrades_in_place(db: str) -> None:
    await _at_revision(db, "0001")
    await _execute(
        db,
        "INSERT INTO scores (id, created_at, model, method, mode, answer_index, confidence,"
        " uncertainty, n_options, raw_confidence) VALUES"
        " ('old1', 1.0, 'fake-model', 'uf', 'logprobs', 0, 0.8, 0.2, 4, 0.7),"
        " ('old2', 2.0, 'fake-model', 'uf', 'logprobs', 1, 0.6, 0.4, 4, 0.6)",
        "INSERT INTO feedback (id, correct, gold_index, received_at) VALUES"
        " ('old1', true, 0, 3.0), ('old2', false, 0, 4.0)",
        "INSERT INTO calibrators (model, method, mode, version, kind, params, labels,"
        " positives, negatives, fitted_at, status) VALUES"
        " ('fake-model', 'uf', 'logprobs', 1, 'platt', '{\"a\": 0.5, \"b\": -1.0}', 2, 1, 1,"
        " 5.0, 'active')",
    )
    store = await Store.open(db)
    try:
        assert store.calibration().n == 2 and store.calibration().accuracy == 0.5
        assert store.calibration("free_form").n == 0
        (old,) = await store.active_calibrators()
        assert old.key == MC_KEY and old.version == 1 and old.params == MC_PLATT
        assert await store.label_counts() == {MC_KEY: 2}
        # the same (model, method, mode) gets a free-form version 1 of its own
        assert (await store.save_calibrator(_calibrator(FF_KEY, FF_PLATT))).version == 1
        assert (await store.save_calibrator(_calibrator(MC_KEY, MC_PLATT))).version == 2
        await store.save_score(_score("new", "free_form"))
        await store.add_feedback("new", correct=True)
        assert store.calibration("free_form").n == 1 and store.calibration().n == 2
    finally:
        await store.close()
    assert await fetch(db, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    tasks = await fetch(db, "SELECT id, task FROM scores ORDER BY id")
    assert tasks == [("new", "free_form"), ("old1", "multiple_choice"), ("old2", "multiple_choice")]
    labels = await fetch(db, "SELECT id, task FROM feedback ORDER BY id")
    assert labels == tasks  # each label carries its score's task


def test_the_live_gauges_of_one_task_leave_the_other_alone() -> None:
    from service.store import live_calibration

    t = Telemetry()
    t.set_live_calibration(live_calibration([0.9, 0.2], [True, False], 100, 10))
    t.set_live_calibration(live_calibration([0.55], [True], 100, 10), "returned", "free_form")
    t.set_live_calibration(live_calibration([], [], 100, 10), "returned", "free_form")
    metrics = gauges(t.render()[0].decode())
    counts = {
        (dict(k[1])["task"], dict(k[1])["bin"]): v
        for k, v in metrics.items()
        if k[0] == "ufcal_live_bin_count" and v
    }
    assert counts == {("multiple_choice", "0.9"): 1, ("multiple_choice", "0.2"): 1}
    names = frozenset({("confidence", "returned"), ("task", "free_form")})
    assert metrics[("ufcal_live_window_size", names)] == 0
