"""Online recalibration against the real engine: ``ufcal serve`` on the vLLM server scores
real questions, takes feedback, refits from it off the request path, and the next /score
carries the new calibrator version and a changed confidence (small thresholds via env)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CORRECTNESS_ENV, START_TIMEOUT_S, load_questions
from tests.servers import EMBEDDED_NAME, ServerProcess, running, ufcal_server

pytestmark = pytest.mark.integration

N_LABELS = 20


@pytest.fixture(scope="module")
def ufcal_online(vllm: ServerProcess, server_logs: Path) -> Iterator[ServerProcess]:
    env = {
        **CORRECTNESS_ENV,
        "UFCAL_ENGINE_TIMEOUT_S": "600",  # correctness, not latency (as CORRECTNESS_ENV)
        "UFCAL_ENGINE_URL": vllm.base_url,
        "UFCAL_DB_PATH": str(server_logs / "ufcal-online.db"),
        "UFCAL_RECALIBRATE": "online",
        "UFCAL_RECALIBRATE_MIN_LABELS": str(N_LABELS),
        "UFCAL_RECALIBRATE_MIN_CLASS": "5",
        "UFCAL_RECALIBRATE_EVERY": str(N_LABELS),
    }
    with running(ufcal_server(server_logs, "ufcal-online", env), "/readyz", START_TIMEOUT_S) as s:
        yield s


def test_feedback_refits_and_the_next_score_carries_the_new_version(
    ufcal_online: ServerProcess,
) -> None:
    # Four ARC questions, each scored five times under new ids (vLLM's prefix cache makes
    # the repeats cheap); every other answer is labelled right, far above the raw UF scores
    # of this near-chance model, so a calibrator moves them.
    rows = load_questions("arc_challenge_test.jsonl", 4)
    with httpx.Client(base_url=ufcal_online.base_url, timeout=300) as client:
        raws = []
        for i in range(N_LABELS):
            row = rows[i % len(rows)]
            body = {"question": row["question"], "options": row["options"], "id": f"r{i}"}
            scored = client.post("/score", json=body)
            assert scored.status_code == 200, scored.text
            reply = scored.json()
            assert reply["calibrator"] is None
            assert reply["confidence"] == reply["raw_confidence"]
            raws.append(reply["raw_confidence"])
            fed = client.post("/feedback", json={"id": f"r{i}", "correct": i % 2 == 0})
            assert fed.status_code == 201, fed.text
        deadline = time.monotonic() + 120
        versions: list[dict[str, object]] = []
        while time.monotonic() < deadline and not versions:
            versions = client.get("/calibrators").json()["calibrators"]
            time.sleep(0.2)
        assert versions, "no refit within 120 s"
        (version,) = versions
        assert version["status"] == "active" and version["labels"] == N_LABELS
        assert version["model"] == EMBEDDED_NAME and version["method"] == "uf"
        assert version["mode"] == "logprobs"
        row = rows[0]
        again = client.post(
            "/score", json={"question": row["question"], "options": row["options"], "id": "next"}
        ).json()
        calibration = client.get("/calibration").json()
    assert again["calibrator"] == {
        "version": version["version"],
        "kind": version["kind"],
        "labels": N_LABELS,
    }
    assert again["raw_confidence"] == pytest.approx(raws[0], abs=1e-6)  # same question
    assert abs(again["confidence"] - again["raw_confidence"]) > 0.05
    assert calibration["n"] == N_LABELS
    assert calibration["raw"]["ece"] == pytest.approx(calibration["ece"])  # all raw so far
