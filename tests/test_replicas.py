"""Two ``ufcal serve`` replicas on one real PostgreSQL and one real vLLM server: a score on
one replica takes its feedback on the other, both report the same live calibration, racing
feedback gives one 201, and a label answered 201 survives kill -9 of its replica."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CORRECTNESS_ENV, START_TIMEOUT_S
from tests.postgres import PostgresServer
from tests.servers import ServerProcess, running, ufcal_server
from tests.test_feedback import fetch

pytestmark = pytest.mark.integration

REFRESH_S = 0.5
#: A few questions of our own (the replicas' machinery is under test, not the data).
QUESTIONS = [
    {"question": "Which planet is closest to the Sun?",
     "options": ["Venus", "Mercury", "Mars", "Earth"], "answer": 1},
    {"question": "What do plants take in to make food?",
     "options": ["Carbon dioxide", "Helium", "Nitrogen gas only", "Salt"], "answer": 0},
    {"question": "Which of these is a mammal?",
     "options": ["Shark", "Frog", "Whale", "Trout"], "answer": 2},
    {"question": "Water boils at sea level at about which temperature?",
     "options": ["50 C", "75 C", "90 C", "100 C"], "answer": 3},
]  # fmt: skip


@pytest.fixture(scope="module")
def pair(
    vllm: ServerProcess, postgres: PostgresServer, server_logs: Path
) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    url = postgres.new_database()
    env = {
        **CORRECTNESS_ENV,
        "UFCAL_ENGINE_URL": vllm.base_url,
        "UFCAL_DB_URL": url,
        "UFCAL_LIVE_REFRESH_S": str(REFRESH_S),
    }
    a = ufcal_server(server_logs, "replica-a", env)
    b = ufcal_server(server_logs, "replica-b", env)
    with running(a, "/readyz", START_TIMEOUT_S), running(b, "/readyz", START_TIMEOUT_S):
        yield a, b, url


def _score(server: ServerProcess, row: dict[str, Any], qid: str) -> dict[str, Any]:
    body = {"id": qid, "question": row["question"], "options": row["options"]}
    r = httpx.post(server.base_url + "/score", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _feedback(server: ServerProcess, qid: str, gold: int) -> httpx.Response:
    return httpx.post(
        server.base_url + "/feedback", json={"id": qid, "gold_index": gold}, timeout=60
    )


def test_score_on_one_replica_feedback_on_the_other(
    pair: tuple[ServerProcess, ServerProcess, str],
) -> None:
    a, b, _ = pair
    rows = QUESTIONS
    for i, row in enumerate(rows):
        scorer, judge = (a, b) if i % 2 == 0 else (b, a)
        _score(scorer, row, f"cross{i}")
        r = _feedback(judge, f"cross{i}", int(row["answer"]))
        assert r.status_code == 201, r.text
    deadline = time.monotonic() + 10 * REFRESH_S + 5
    while True:
        cal_a = httpx.get(a.base_url + "/calibration").json()
        cal_b = httpx.get(b.base_url + "/calibration").json()
        if (cal_a == cal_b and cal_a["n"] >= len(rows)) or time.monotonic() > deadline:
            break
        time.sleep(REFRESH_S / 2)
    assert cal_a == cal_b
    assert cal_a["n"] >= len(rows)


def test_racing_feedback_on_both_replicas_gives_one_201(
    pair: tuple[ServerProcess, ServerProcess, str],
) -> None:
    a, b, url = pair
    row = QUESTIONS[0]
    ids = [f"race{i}" for i in range(6)]
    for qid in ids:
        _score(a, row, qid)
    with ThreadPoolExecutor(max_workers=2 * len(ids)) as pool:
        futures = {
            (qid, s.name): pool.submit(_feedback, s, qid, int(row["answer"]))
            for qid in ids
            for s in (a, b)
        }
        codes = {key: f.result().status_code for key, f in futures.items()}
    for qid in ids:
        assert sorted([codes[(qid, a.name)], codes[(qid, b.name)]]) == [201, 409], codes
    rows = asyncio.run(
        fetch(url, "SELECT id, COUNT(*) FROM feedback WHERE id LIKE 'race%' GROUP BY id")
    )
    assert sorted(rows) == [(qid, 1) for qid in ids]


def test_a_label_answered_201_survives_kill_9(
    vllm: ServerProcess, postgres: PostgresServer, server_logs: Path
) -> None:
    url = postgres.new_database()
    env = {**CORRECTNESS_ENV, "UFCAL_ENGINE_URL": vllm.base_url, "UFCAL_DB_URL": url}
    row = QUESTIONS[0]
    victim = ufcal_server(server_logs, "replica-killed", env)
    with running(victim, "/readyz", START_TIMEOUT_S):
        _score(victim, row, "kept")
        assert _feedback(victim, "kept", int(row["answer"])).status_code == 201
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
    rows = asyncio.run(fetch(url, "SELECT id, gold_index FROM feedback"))
    assert rows == [("kept", int(row["answer"]))]
    with running(ufcal_server(server_logs, "replica-after", env), "/readyz", START_TIMEOUT_S) as s:
        assert _feedback(s, "kept", 0).status_code == 409
        assert httpx.get(s.base_url + "/calibration").json()["n"] == 1
