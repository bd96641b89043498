"""Integration tests against a real vLLM engine serving the real SmolLM2 model.

Both engines are exercised: vLLM's OpenAI-compatible server (through the HTTP engine and
through ``ufcal serve`` with UFCAL_ENGINE_URL) and the in-process AsyncLLM engine (through
``ufcal serve`` with no engine URL, which is what ``make serve`` runs). Every returned
uncertainty, fidelity and confidence is recomputed here from the returned distribution and
chains with the spec's formulas, written out independently of the service's code."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest

from service.calibration.prompts import PromptTemplate, Question, all_options, render
from service.engines.openai_http import OpenAIHTTPEngine
from service.scoring import ScoreParams, score
from tests.conftest import load_questions
from tests.servers import EMBEDDED_NAME, ServerProcess
from tests.test_api import RESPONSE_FIELDS, USAGE_FIELDS

pytestmark = pytest.mark.integration

ARC = "arc_challenge_test.jsonl"
N_QUESTIONS = 6
EPS = 0.01
TOL = 1e-9


def spec_uncertainty(p: dict[str, float]) -> float:
    m = len(p)
    return -sum(v * math.log(v) for v in p.values() if v > 0) / math.log(m)


def spec_fidelity(
    p: dict[str, float], chains: dict[str, list[str]], tau: float
) -> dict[str, float]:
    mass = sum(p[s] for s in chains)
    f = dict.fromkeys(p, 0.0)
    for s, chain in chains.items():
        n = len(chain)
        norm = sum(tau**i for i in range(1, n + 1))
        for pos, d in enumerate(chain):
            f[d] += p[s] / mass * tau ** (n - pos) / norm
    return f


def check_response(body: dict[str, Any], row: dict[str, Any], mode: str, tau: float = 2.0) -> None:
    """Every field of the contract, and the numbers recomputed with the spec's formulas."""
    labels = [chr(ord("A") + i) for i in range(len(row["options"]))]
    assert body["mode"] == mode
    assert body["method"] == "uf"
    assert body["model"] == EMBEDDED_NAME
    answer = body["answer"]
    assert answer["label"] == labels[answer["index"]]
    assert answer["text"] == row["options"][answer["index"]].strip()
    p = body["distribution"]
    assert list(p) == labels
    assert math.isclose(sum(p.values()), 1.0, abs_tol=1e-6)
    # The answer is argmax P, ties to the earliest option.
    assert answer["index"] == max(range(len(labels)), key=lambda i: (p[labels[i]], -i))
    # The start set: P > 0 (sampling) or P >= eps (logprobs).
    expected_starts = {a for a, v in p.items() if (v >= EPS if mode == "logprobs" else v > 0)}
    assert set(body["chains"]) == expected_starts
    for start, chain in body["chains"].items():
        assert chain[0] == start
        assert len(set(chain)) == len(chain)
        assert set(chain) <= set(labels)
    u = spec_uncertainty(p)
    assert math.isclose(body["uncertainty"], u, abs_tol=TOL)
    f = spec_fidelity(p, body["chains"], tau)
    assert body["fidelity"].keys() == f.keys()
    for label in labels:
        assert math.isclose(body["fidelity"][label], f[label], abs_tol=TOL)
    assert math.isclose(sum(f.values()), 1.0, abs_tol=1e-9)
    assert math.isclose(body["confidence"], (1 - u) * f[answer["label"]], abs_tol=TOL)
    assert 0.0 <= body["confidence"] <= 1.0 - body["uncertainty"] + TOL
    usage = body["usage"]
    longest = max(len(c) for c in body["chains"].values())
    # Step 1, then one lockstep batch per chain step (a chain of n needs n steps unless it
    # ended on its last option, when the final "back to the start" step is not needed).
    assert 2 <= usage["engine_calls"] <= 1 + longest
    assert usage["prompts"] >= 1 + len(body["chains"])
    assert usage["prompt_tokens"] > 0
    assert body["latency_ms"] > 0


def score_over_http(server: ServerProcess, rows: list[dict[str, Any]], mode: str) -> list[Any]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            "/score",
                            json={
                                "question": r["question"],
                                "options": r["options"],
                                "mode": mode,
                                "id": r["id"],
                            },
                        )
                        for r in rows
                    )
                )
            )

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["logprobs", "sampling"])
def test_score_arc_through_the_vllm_server(ufcal_remote: ServerProcess, mode: str) -> None:
    rows = load_questions(ARC, N_QUESTIONS)
    responses = score_over_http(ufcal_remote, rows, mode)
    unparsed = 0
    for row, response in zip(rows, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == row["id"]
        check_response(body, row, mode)
        unparsed += body["usage"]["unparsed"]
    if mode == "sampling":
        # The prompt must make the model answer with a letter most of the time.
        assert unparsed <= 0.3 * 10 * len(rows)


@pytest.mark.parametrize("mode", ["logprobs", "sampling"])
def test_score_arc_with_the_in_process_engine(ufcal_local: ServerProcess, mode: str) -> None:
    rows = load_questions(ARC, N_QUESTIONS)
    for row, response in zip(rows, score_over_http(ufcal_local, rows, mode), strict=True):
        assert response.status_code == 200, response.text
        check_response(response.json(), row, mode)


def test_both_engines_read_the_same_letter_distribution(
    ufcal_local: ServerProcess, ufcal_remote: ServerProcess
) -> None:
    rows = load_questions(ARC, 3)
    local = score_over_http(ufcal_local, rows, "logprobs")
    remote = score_over_http(ufcal_remote, rows, "logprobs")
    for a, b in zip(local, remote, strict=True):
        pa, pb = a.json()["distribution"], b.json()["distribution"]
        assert max(abs(pa[k] - pb[k]) for k in pa) < 1e-3


async def test_prompt_puts_the_next_token_mass_on_letters(vllm: ServerProcess) -> None:
    """The brief measured ~8% letter mass on the bare prompt; ours must be a real answer."""
    engine = OpenAIHTTPEngine([vllm.base_url])
    await engine.start()
    try:
        rows = load_questions(ARC, 10)
        questions = [Question(r["question"], tuple(r["options"])) for r in rows]
        template = PromptTemplate()
        prompts = [render(q, all_options(q), template) for q in questions]
        reads = await engine.read_letters(prompts, [q.labels for q in questions])
        mass = [sum(math.exp(v) for v in r.logprobs.values()) for r in reads]
        assert sum(mass) / len(mass) > 0.6, mass
    finally:
        await engine.close()


async def test_engine_batches_all_chains_of_a_question(vllm: ServerProcess) -> None:
    engine = OpenAIHTTPEngine([vllm.base_url])
    await engine.start()
    try:
        row = load_questions(ARC, 1)[0]
        question = Question(row["question"], tuple(row["options"]))
        result = await score(question, engine, ScoreParams(mode="logprobs"), PromptTemplate())
        steps = result.usage.engine_calls - 1
        # Lockstep: the number of rounds is set by the longest chain, not by their sum.
        assert steps <= max(len(c) for c in result.chains.values())
        assert result.usage.prompts - 1 >= steps
    finally:
        await engine.close()


def test_http_contract_end_to_end(ufcal_remote: ServerProcess) -> None:
    with httpx.Client(base_url=ufcal_remote.base_url, timeout=120) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"] == EMBEDDED_NAME
        assert client.get("/docs").status_code == 200
        assert "/score" in client.get("/openapi.json").json()["paths"]
        bad = client.post("/score", json={"question": "Q?", "options": ["only one"]})
        assert bad.status_code == 422 and "options" in bad.text
        bad = client.post("/score", json={"question": "Q?", "options": ["a", "b"], "mode": "x"})
        assert bad.status_code == 422 and "mode" in bad.text
        good = client.post(
            "/score",
            json={"question": "What is 2 + 2?", "options": ["3", "4", "5"], "id": "sum"},
        )
        assert good.status_code == 200
        body = good.json()
        assert body["id"] == "sum"
        assert set(body) >= RESPONSE_FIELDS
        assert set(body["usage"]) >= USAGE_FIELDS
