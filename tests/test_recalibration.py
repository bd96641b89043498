"""Recalibration in the service, over the fake engine: online refits from /feedback, the
response contract, versions that survive a restart, promotion and rejection, the source cap,
feedback keys, calibrator files and ``ufcal calibrate``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.calibration.recalibrate import Calibrator
from service.cli import main
from service.recalibration import (
    CalibratorFileError,
    RecalibrationConfig,
    Recalibrator,
    load_calibrator_file,
)
from service.store import CalibratorRecord, ScoreRecord, Store
from service.telemetry import Telemetry
from tests.fake_app import build_app
from tests.test_feedback import _settings, gauges, question, score, serve

KEY = ("fake-model", "uf", "logprobs", "multiple_choice")
ONLINE = {
    "recalibrate": "online",
    "recalibrate_min_labels": 40,
    "recalibrate_min_class": 8,
    "recalibrate_every": 40,
}


def p_of(i: int) -> float:
    return round(0.5 + 0.49 * (i % 50) / 49, 4)


async def wait_for_versions(client: httpx.AsyncClient, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120  # generous: a loaded CI machine
    while time.monotonic() < deadline:
        versions: list[dict[str, Any]] = (await client.get("/calibrators")).json()["calibrators"]
        if len(versions) >= n:
            return versions
        await asyncio.sleep(0.05)
    raise AssertionError(f"no refit after 120 s: {versions}")


async def label(client: httpx.AsyncClient, n: int, start: int = 0, **headers: str) -> None:
    """Score n questions and say every third answer was right (whatever the confidence:
    the raw scores, 0.25 to 0.95, are far too high)."""
    for i in range(start, start + n):
        await score(client, f"q{i}", p_of(i))
        r = await client.post(
            "/feedback", json={"id": f"q{i}", "correct": i % 3 == 0}, headers=headers
        )
        assert r.status_code == 201, r.text


async def test_online_refit_changes_the_next_score_and_survives_a_restart(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "u.db", **ONLINE)
    async with serve(settings) as client:
        before = await score(client, "first", 0.9)
        assert before["calibrator"] is None
        assert before["confidence"] == before["raw_confidence"]
        await label(client, 40)
        versions = await wait_for_versions(client, 1)
        after = await score(client, "next", 0.9)
        calibration = (await client.get("/calibration")).json()
        metrics = gauges((await client.get("/metrics")).text)
    (v1,) = versions
    assert (v1["model"], v1["method"], v1["mode"], v1["task"]) == KEY
    assert v1["version"] == 1 and v1["status"] == "active"
    assert v1["labels"] == 40 and v1["positives"] == 14 and v1["negatives"] == 26
    assert v1["kind"] in ("platt", "beta")
    assert v1["window"]["n"] == 40 and v1["window"]["first"] <= v1["window"]["last"]
    assert set(v1["metrics"]["before"]) == {"ece", "brier", "log_loss", "auroc"}
    assert v1["metrics"]["after"]["log_loss"] < v1["metrics"]["before"]["log_loss"]
    assert after["calibrator"] == {"version": 1, "kind": v1["kind"], "labels": 40}
    assert after["raw_confidence"] == pytest.approx(before["raw_confidence"])
    assert after["confidence"] < after["raw_confidence"] - 0.1  # pulled towards 1 in 3
    # /calibration: top level = returned; raw and returned side by side
    assert calibration["n"] == 40
    assert calibration["returned"]["ece"] == calibration["ece"]
    assert calibration["raw"]["ece"] == calibration["ece"]  # all 40 labels predate v1
    assert len(calibration["raw"]["bins"]) == len(calibration["bins"])
    labels = frozenset(zip(("model", "method", "mode", "task"), KEY, strict=True))
    assert metrics[("ufcal_calibrator_version", labels)] == 1.0
    assert metrics[("ufcal_calibrator_labels", labels)] == 40.0
    assert metrics[("ufcal_recalibrations_total", frozenset({("outcome", "promoted")}))] == 1.0
    assert metrics[
        ("ufcal_live_ece", frozenset({("confidence", "raw"), ("task", "multiple_choice")}))
    ] == pytest.approx(calibration["raw"]["ece"])
    # the store keeps both numbers and the version of every score
    with sqlite3.connect(tmp_path / "u.db") as db:
        row = db.execute(
            "SELECT confidence, raw_confidence, calibrator_version FROM scores WHERE id = 'next'"
        ).fetchone()
    assert row == (pytest.approx(after["confidence"]), pytest.approx(after["raw_confidence"]), 1)

    # a restart serves the promoted version
    async with serve(settings) as client:
        again = await score(client, "after-restart", 0.9)
        r = await client.post("/feedback", json={"id": "after-restart", "correct": False})
        calibration = (await client.get("/calibration")).json()
    assert again["calibrator"] == after["calibrator"]
    assert again["confidence"] == pytest.approx(after["confidence"])
    assert r.json()["confidence"] == pytest.approx(after["confidence"])  # the returned one
    assert calibration["n"] == 41 and calibration["ece"] != calibration["raw"]["ece"]


async def test_batch_results_carry_the_calibrator(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "u.db", **ONLINE)) as client:
        await label(client, 40)
        await wait_for_versions(client, 1)
        r = await client.post(
            "/score/batch", json={"items": [question("b1", 0.7), question("b2", 0.95)]}
        )
    for item in r.json()["results"]:
        result = item["result"]
        assert result["calibrator"]["version"] == 1
        assert result["confidence"] != result["raw_confidence"]


async def test_off_by_default_no_refit(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "u.db", recalibrate_min_labels=40)) as client:
        await label(client, 45)
        await asyncio.sleep(0.2)
        assert (await client.get("/calibrators")).json() == {"calibrators": []}
        assert (await score(client, "x", 0.8))["calibrator"] is None


async def _store_with_labels(path: Path, correct: list[bool], raw: list[float]) -> Store:
    """A store holding one score and one label per pair (concurrent: one commit per batch)."""
    store = await Store.open(path)
    await asyncio.gather(
        *(
            store.save_score(
                ScoreRecord(
                    f"s{i}",
                    *KEY[:3],
                    task=KEY[3],
                    answer_index=0,
                    confidence=s,
                    uncertainty=0.0,
                    n_options=4,
                    created_at=time.time(),
                )
            )
            for i, s in enumerate(raw)
        )
    )
    for start in range(0, len(correct), 100):  # feedback keeps its order across batches
        await asyncio.gather(
            *(
                store.add_feedback(f"s{i}", correct=correct[i])
                for i in range(start, min(start + 100, len(correct)))
            )
        )
    return store


async def test_a_candidate_worse_on_the_newest_labels_is_rejected_and_the_active_stays(
    tmp_path: Path,
) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    raw = rng.uniform(0.01, 0.99, 500)
    correct = rng.uniform(0, 1, 500) < raw**2  # older labels: P = s^2
    correct[400:] = rng.uniform(0, 1, 100) < raw[400:]  # the newest fifth: P = s
    store = await _store_with_labels(tmp_path / "r.db", list(correct), list(raw))
    try:
        identity = await store.save_calibrator(
            CalibratorRecord(
                *KEY[:3],
                task=KEY[3],
                version=0,
                kind="platt",
                params={"a": 1.0, "b": 0.0},
                labels=0,
                positives=0,
                negatives=0,
                window={},
                metrics={},
                fitted_at=time.time(),
                status="active",
            )
        )
        telemetry = Telemetry()
        recal = Recalibrator(store, telemetry, RecalibrationConfig(online=True, window=500))
        await recal.start()
        assert recal.active(KEY) is not None and recal.active(KEY).version == identity.version  # type: ignore[union-attr]
        assert await recal.refit(KEY) == "rejected"
        assert recal.active(KEY).version == 1  # type: ignore[union-attr]
        versions = await store.calibrator_versions()
        assert [(v.version, v.status) for v in versions] == [(1, "active"), (2, "rejected")]
        holdout = versions[1].metrics["holdout"]
        assert holdout["n"] == 100 and holdout["candidate_log_loss"] > holdout["active_log_loss"]
        # with labels that follow s^2 throughout, a candidate beats the identity: promoted,
        # and the old version is retired in the same transaction
        await store.close()
        (tmp_path / "r.db").unlink()
        correct = rng.uniform(0, 1, 500) < raw**2
        store = await _store_with_labels(tmp_path / "r.db", list(correct), list(raw))
        await store.save_calibrator(identity)
        recal = Recalibrator(store, telemetry, RecalibrationConfig(online=True, window=500))
        await recal.start()
        assert await recal.refit(KEY) == "promoted"
        assert recal.active(KEY).version == 2  # type: ignore[union-attr]
        statuses = [(v.version, v.status) for v in await store.calibrator_versions()]
        assert statuses == [(1, "retired"), (2, "active")]
    finally:
        await store.close()


async def test_a_key_over_its_share_is_capped_and_sources_are_hashes(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path / "u.db",
        api_keys="key-one,key-two",
        **ONLINE,  # type: ignore[arg-type]
    )
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    async with serve(settings) as client:
        client.headers.update(one)
        await label(client, 34, **one)
        await label(client, 6, start=34, **two)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = gauges((await client.get("/metrics")).text)
            if ("ufcal_recalibrations_total", frozenset({("outcome", "too_few")})) in metrics:
                break
            await asyncio.sleep(0.05)
    labels = frozenset(zip(("model", "method", "mode", "task"), KEY, strict=True))
    # key-one may hold at most half of the labels used: 6 of its 34 stay, 28 are left out,
    # and 12 labels are below the minimum: no calibrator.
    assert metrics[("ufcal_recalibration_labels_capped", labels)] == 28.0
    assert metrics[("ufcal_recalibrations_total", frozenset({("outcome", "too_few")}))] == 1.0
    with sqlite3.connect(tmp_path / "u.db") as db:
        sources = [r[0] for r in db.execute("SELECT source FROM feedback ORDER BY seq")]
        dump = "\n".join(db.iterdump())
    assert sources[0] == hashlib.sha256(b"key-one").hexdigest()[:16]
    assert sources[-1] == hashlib.sha256(b"key-two").hexdigest()[:16]
    assert "key-one" not in dump and "key-two" not in dump


async def test_feedback_keys_restrict_who_may_label(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path / "u.db",
        api_keys="scorer,labeller",  # type: ignore[arg-type]
        feedback_keys="labeller",  # type: ignore[arg-type]
    )
    async with serve(settings) as client:
        client.headers["Authorization"] = "Bearer scorer"
        await score(client, "q", 0.8)
        refused = await client.post("/feedback", json={"id": "q", "correct": True})
        allowed = await client.post(
            "/feedback",
            json={"id": "q", "correct": True},
            headers={"Authorization": "Bearer labeller"},
        )
    assert refused.status_code == 403 and "UFCAL_FEEDBACK_KEYS" in refused.json()["detail"]
    assert allowed.status_code == 201


def calibrator_file(path: Path, **overrides: Any) -> Path:
    entry = {
        "model": "fake-model",
        "method": "uf",
        "mode": "logprobs",
        "kind": "platt",
        "params": {"a": 0.5, "b": -1.0},
        "labels": 300,
    }
    entry.update(overrides)
    path.write_text(json.dumps({"calibrators": [entry]}))
    return path


async def test_calibrator_files_are_imported_once(tmp_path: Path) -> None:
    path = calibrator_file(tmp_path / "cal.json")
    settings = _settings(tmp_path / "u.db", calibrators=str(path))
    expected = Calibrator("platt", {"a": 0.5, "b": -1.0})
    from service.calibration.recalibrate import apply

    for _ in range(2):  # the second start finds it in the store: no second version
        async with serve(settings) as client:
            body = await score(client, "q", 0.9)
            versions = (await client.get("/calibrators")).json()["calibrators"]
        assert body["calibrator"] == {"version": 1, "kind": "platt", "labels": 300}
        assert body["confidence"] == pytest.approx(apply(expected, body["raw_confidence"]))
        assert [(v["version"], v["status"]) for v in versions] == [(1, "active")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON calibrator file"),
        ('{"calibrators": {}}', "'calibrators' list"),
        (None, "unknown method 'magic'"),
        (None, "must be a finite number"),
        (None, "unknown calibrator kind"),
    ],
)
def test_a_bad_calibrator_file_is_refused_at_start_naming_it(
    tmp_path: Path,
    content: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    elif "method" in message:
        calibrator_file(path, method="magic")
    elif "finite" in message:
        path.write_text(
            json.dumps(
                {
                    "calibrators": [
                        {
                            "model": "m",
                            "method": "uf",
                            "mode": "logprobs",
                            "kind": "beta",
                            "params": {"a": 1.0, "b": float("nan"), "c": 0.0},
                        }
                    ]
                }
            )
        )
    else:
        calibrator_file(path, kind="spline")
    with pytest.raises(CalibratorFileError, match=message) as raised:
        load_calibrator_file(path)
    assert str(path) in str(raised.value)
    with pytest.raises(CalibratorFileError):
        build_app(_settings(tmp_path / "u.db", calibrators=str(path)))
    monkeypatch.setenv("UFCAL_CALIBRATORS", str(path))
    monkeypatch.setenv("UFCAL_DB_PATH", str(tmp_path / "u.db"))
    assert main(["serve", "--port", "1"]) == 2  # refused before any engine or socket
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_calibrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    rng = np.random.default_rng(4)
    rows = []
    for i in range(400):
        s = float(rng.uniform(0, 1))
        rows.append(
            {
                "model": "m",
                "method": "uf",
                "mode": "sampling",
                "confidence": s,
                "correct": bool(rng.uniform() < s**2),
                "dataset": "x",
                "id": str(i),
            }
        )
    rows.append(
        {"model": "m", "method": "token", "mode": "logprobs", "confidence": 0.5, "correct": True}
    )
    rows.append({"dataset": "x", "id": "bad", "method": "uf", "mode": "sampling", "error": "no"})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(results), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| m | uf | sampling | multiple_choice | 400 |" in table and "too few labels" in table
    (record,) = load_calibrator_file(out)
    assert (record.model, record.method, record.mode, record.labels) == ("m", "uf", "sampling", 400)
    assert record.metrics["after"]["ece"] < record.metrics["before"]["ece"]
    # --method: only that one; none of it has enough labels
    assert main(["calibrate", str(results), "--method", "token", "--out", str(out)]) == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"model": "m", "method": "uf", "mode": "logprobs", "confidence": 0.3}'], "no labels"),
        ([], "no labels"),
        (
            ['{"model": "m", "method": "uf", "mode": "x", "confidence": 0.3, "correct": true}'],
            'line 1: "mode"',
        ),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (
            ['{"method": "uf", "mode": "logprobs", "confidence": 0.3, "correct": true}'],
            'missing field "model"',
        ),
    ],
)
def test_calibrate_refuses_bad_input_in_one_line(
    tmp_path: Path, lines: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(results), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not out.exists()
    assert main(["calibrate", str(tmp_path / "missing.jsonl")]) == 2
