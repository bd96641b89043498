"""Free-form questions and given answers on the real SmolLM2 with the in-process vLLM
engine (``ufcal serve``, the ``ufcal_local`` session server): the reply's shape, every
confidence in [0, 1], the groups' raw confidences recomputed with the spec's formulas from
the returned distribution and chains, and the given answer's confidence equal to its
group's. The model is chance-level: nothing here checks that it is right. Kept cheap for
a 2-core box: 4 samples, a budget of 24 prompts, all requests in flight together."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest

from tests.servers import ServerProcess
from tests.test_api import RESPONSE_FIELDS
from tests.test_integration_vllm import spec_fidelity, spec_uncertainty

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
FREE = {"question": QUESTION, "mode": "logprobs", "samples": 4, "max_prompts": 24}
REQUESTS: list[dict[str, Any]] = [
    {**FREE, "id": "ff-none"},
    {**FREE, "id": "ff-paris", "answer": "Paris"},
    {**FREE, "id": "ff-odd", "answer": "A purple elephant named Gerald"},
    {
        "question": QUESTION,
        "options": ["Paris", "Rome", "Berlin", "Madrid"],
        "answer": "b",
        "id": "mc-given",
        "mode": "logprobs",
    },
]


def _check_free_form(body: dict[str, Any], request: dict[str, Any]) -> None:
    assert set(body) == RESPONSE_FIELDS
    assert body["task"] == "free_form" and body["method"] == "uf"
    groups, labels = body["groups"], list(body["distribution"])
    abstention = body["free_form"]["abstention"]
    assert 1 <= len(groups) <= 26
    assert len(labels) == len(groups) + (abstention is not None) >= 2
    p = body["distribution"]
    assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
    u = spec_uncertainty(p)
    f = spec_fidelity(p, body["chains"], 2.0)
    assert math.isclose(body["uncertainty"], u, abs_tol=1e-9)
    for group, label in zip(groups, labels, strict=False):
        assert group["label"] == label
        assert 0.0 <= group["confidence"] <= 1.0 and 0.0 <= group["raw_confidence"] <= 1.0
        assert math.isclose(group["raw_confidence"], (1 - u) * f[label], abs_tol=1e-9)
    answer = body["answer"]
    assert 0.0 <= body["confidence"] <= 1.0
    assert math.isclose(body["raw_confidence"], (1 - u) * f[answer["label"]], abs_tol=1e-9)
    if answer["index"] < len(groups):
        assert answer["text"] == groups[answer["index"]]["representative"]
        assert body["confidence"] == groups[answer["index"]]["confidence"]
    else:
        assert answer["text"] == abstention
    ff = body["free_form"]
    assert ff["samples_taken"] == 4 and 1 <= ff["samples_usable"] <= 4
    assert sum(g["count"] for g in groups) + ff["dropped_samples"] == ff["samples_usable"]
    assert 0.0 < ff["largest_group_share"] <= 1.0
    usage = body["usage"]
    assert 2 <= usage["prompts"] <= request["max_prompts"]
    assert usage["prompts"] >= 1 + ff["judge_prompts"] + 1
    given = body["given"]
    if "answer" not in request:
        assert given is None and not any(g["given"] for g in groups)
        return
    assert given["answer"] == request["answer"]
    group = groups[given["index"]]
    assert group["given"] and sum(g["given"] for g in groups) == 1
    assert given["confidence"] == group["confidence"]
    assert given["raw_confidence"] == group["raw_confidence"]
    assert 0.0 <= given["confidence"] <= 1.0
    assert given["match"] in ("exact", "judge", "absent")
    assert (given["match"] == "absent") == (group["count"] == 0)


def test_free_form_and_given_answers_on_the_in_process_engine(ufcal_local: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=ufcal_local.base_url, timeout=600) as client:
            return list(await asyncio.gather(*(client.post("/score", json=r) for r in REQUESTS)))

    replies = asyncio.run(run())
    for request, reply in zip(REQUESTS, replies, strict=True):
        assert reply.status_code == 200, (request["id"], reply.text)
        body = reply.json()
        assert body["id"] == request["id"]
        if "options" in request:
            assert body["task"] == "multiple_choice"
            given = body["given"]
            assert given["index"] == 1 and given["answer"] == "Rome"
            u, f = body["uncertainty"], body["fidelity"]["B"]
            assert math.isclose(given["raw_confidence"], (1 - u) * f, abs_tol=1e-9)
        else:
            _check_free_form(body, request)
