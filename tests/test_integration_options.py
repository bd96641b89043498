"""Every option count works on the real engines (issue 13): M = 2, 10, 11, 13 and 26, in
logprobs mode, plus one sampling case, through ``ufcal serve`` on the vLLM server and on
the in-process engine (whose default cap of 20 log-probs per token refused 11+ options).
Kept cheap for a 2-core CI box: small budgets and few samples, one request per case, all
of an engine's cases in flight together."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest

from service.bench.questions import questions_with_options
from tests.servers import SHARED_DATA, ServerProcess
from tests.test_integration_vllm import spec_fidelity, spec_uncertainty

pytestmark = pytest.mark.integration

# (options, mode, extra request fields)
CASES: list[tuple[int, str, dict[str, Any]]] = [
    (2, "logprobs", {}),
    (10, "logprobs", {"max_prompts": 12}),
    (11, "logprobs", {"max_prompts": 12}),
    (13, "logprobs", {"max_prompts": 12}),
    (26, "logprobs", {"max_prompts": 16}),
    (26, "sampling", {"samples": 3, "max_prompts": 6}),
]


def _check(body: dict[str, Any], m: int, mode: str, budget: int) -> None:
    labels = [chr(ord("A") + i) for i in range(m)]
    assert body["mode"] == mode
    p = body["distribution"]
    assert list(p) == labels
    assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
    assert body["answer"]["label"] in labels
    for start, chain in body["chains"].items():
        assert chain[0] == start and set(chain) <= set(labels)
    f = spec_fidelity(p, body["chains"], 2.0)
    for label in labels:
        assert math.isclose(body["fidelity"][label], f[label], abs_tol=1e-9)
    u = spec_uncertainty(p)
    assert math.isclose(body["confidence"], (1 - u) * f[body["answer"]["label"]], abs_tol=1e-9)
    usage = body["usage"]
    assert 2 <= usage["prompts"] <= budget
    if usage["prompts"] < budget:
        assert usage["chains_cut"] == 0
    assert 0.0 <= usage["dropped_mass"] <= 1.0
    assert usage["budget_hit"] == (usage["dropped_mass"] > 0 or usage["chains_cut"] > 0)


def _score_every_case(server: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            requests = []
            for m, mode, extra in CASES:
                (q,) = questions_with_options(SHARED_DATA, m, 1)
                body = {"question": q.question, "options": list(q.options), "mode": mode}
                requests.append(client.post("/score", json={**body, **extra}))
            return list(await asyncio.gather(*requests))

    for (m, mode, extra), reply in zip(CASES, asyncio.run(run()), strict=True):
        assert reply.status_code == 200, (m, mode, reply.text)
        _check(reply.json(), m, mode, int(extra.get("max_prompts", 64)))


def test_option_counts_through_the_vllm_server(ufcal_remote: ServerProcess) -> None:
    _score_every_case(ufcal_remote)


def test_option_counts_with_the_in_process_engine(ufcal_local: ServerProcess) -> None:
    _score_every_case(ufcal_local)
