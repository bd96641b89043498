"""Prefix-affine routing on two real vLLM servers behind one ``ufcal serve``.

Which server computed what is read from each server's own counters (its /metrics:
``vllm:request_success_total``), never from ufcal. The session's vLLM server is the first;
this module starts a second one and stops it halfway, so that the failover is real too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.calibration.prompts import Question, prefix_key
from service.config import Settings
from service.engines.routing import rank
from tests.conftest import CORRECTNESS_ENV, START_TIMEOUT_S
from tests.servers import ServerProcess, running, ufcal_server, vllm_server

pytestmark = pytest.mark.integration

PER_SERVER = 2  # questions owned by each server
# Any questions do: what matters is where their keys send them, not what they ask.
ROWS = [
    {"question": f"Which number is the largest? (set {i})", "options": ["3", "17", "8", "11"]}
    for i in range(40)
]


@pytest.fixture(scope="module")
def second_vllm(model_dir: Path, server_logs: Path) -> Iterator[ServerProcess]:
    server = vllm_server(model_dir, server_logs)
    server.name = "vllm-2"
    server.log_path = server_logs / "vllm-2.log"
    with running(server, "/health", START_TIMEOUT_S) as started:
        yield started


def _requests(base: str) -> float:
    """The server's finished requests so far, from its own Prometheus counters."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10.0).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:request_success"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def _score_and_count(
    client: httpx.Client, row: dict[str, Any], servers: list[str]
) -> dict[str, float]:
    """Score one question; the requests each live server finished meanwhile."""
    before = {s: _requests(s) for s in servers}
    reply = client.post(
        "/score", json={"question": row["question"], "options": row["options"], "mode": "logprobs"}
    )
    assert reply.status_code == 200, reply.text
    prompts = reply.json()["usage"]["prompts"]
    deadline = time.monotonic() + 10.0
    while True:  # the counters are updated as vLLM's output loop finishes each request
        delta = {s: _requests(s) - before[s] for s in servers}
        if sum(delta.values()) >= prompts or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(delta.values()) == prompts, (delta, prompts)
    return delta


def test_every_prompt_of_a_question_reaches_one_server_and_failover_moves_only_its_own(
    vllm: ServerProcess, second_vllm: ServerProcess, server_logs: Path
) -> None:
    first, second = vllm.base_url, second_vllm.base_url
    urls = [first, second]
    template = Settings().prompt_template()
    owner: dict[int, str] = {}
    rows = ROWS
    for index, row in enumerate(rows):
        key = prefix_key(Question(row["question"], tuple(row["options"])), template)
        home = rank(urls, key)[0]
        if sum(1 for o in owner.values() if o == home) < PER_SERVER:
            owner[index] = home
    assert sorted(owner.values()) == sorted(urls * PER_SERVER)

    env = {
        **CORRECTNESS_ENV,
        "UFCAL_ENGINE_URL": ",".join(urls),
        "UFCAL_DB_PATH": str(server_logs / "ufcal-routing.db"),
        "UFCAL_HEALTH_INTERVAL_S": "1",
    }
    with (
        running(ufcal_server(server_logs, "ufcal-routing", env), "/readyz", START_TIMEOUT_S) as app,
        httpx.Client(base_url=app.base_url, timeout=600.0) as client,
    ):
        for index, home in owner.items():
            delta = _score_and_count(client, rows[index], urls)
            # every prompt of the question on the server its key ranks first, none elsewhere
            assert delta[home] > 1 and all(delta[s] == 0 for s in urls if s != home), delta

        second_vllm.stop()
        for index in owner:
            delta = _score_and_count(client, rows[index], [first])
            assert delta[first] > 1  # the stopped server's questions moved, the others stayed
        health = client.get("/readyz")
        assert health.status_code == 200  # one server left is enough
