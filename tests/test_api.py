"""Tests of the HTTP layer (service.api.app) over the scriptable fake engine: no vLLM, no
sockets (httpx's ASGI transport), with the app's lifespan run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.api.app import create_app
from service.config import Settings
from service.engines.base import EngineError, EngineFeatureMissing, EngineUnavailable
from tests.fakes import FakeEngine, chain_script_generate, chain_script_letters, log

try:  # asgi-lifespan runs startup/shutdown like a server would
    from asgi_lifespan import LifespanManager
except ImportError:  # pragma: no cover - FastAPI's own lifespan context does the same here
    LifespanManager = None

OPTIONS = ["alpha", "beta", "gamma", "delta", "epsilon"]
GOOD = {"question": "Which one?", "options": OPTIONS}
WORKED_FIRST = {"A": log(0.3), "C": log(0.1), "D": log(0.6)}
FIG3_SCRIPT = {"D": ["A", "C"], "A": ["D", "C"], "C": ["A", "D"]}
FIG3_SAMPLES = [" D", "D.", "(D)", "A", "Answer: A", "The answer is C"]
FIG3_REPLIES: dict[str, list[str | None]] = {
    "D": [" A", " C"],
    "A": [" D", " C"],
    "C": [" A", " D"],
}
RESPONSE_FIELDS = {
    "id",
    "answer",
    "confidence",
    "raw_confidence",
    "calibrator",
    "uncertainty",
    "distribution",
    "fidelity",
    "chains",
    "method",
    "mode",
    "model",
    "usage",
    "latency_ms",
    "task",
    "given",
    "groups",
    "free_form",
}
USAGE_FIELDS = {
    "max_prompts",
    "budget_fitted",
    "engine_calls",
    "prompts",
    "unparsed",
    "prompt_tokens",
    "completion_tokens",
    "budget_hit",
    "dropped_mass",
    "chains_cut",
}


def white_box(**kwargs: Any) -> FakeEngine:
    """A fake white-box engine scripted with the spec's worked example (Fig. 3 chains)."""
    return FakeEngine(
        letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5),
        generate=chain_script_generate(FIG3_SAMPLES, FIG3_REPLIES, 5),
        **kwargs,
    )


def black_box(samples: list[str] | None = None, **kwargs: Any) -> FakeEngine:
    return FakeEngine(
        generate=chain_script_generate(samples or FIG3_SAMPLES, FIG3_REPLIES, 5), **kwargs
    )


def _settings(**kwargs: Any) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    if LifespanManager is not None:
        async with LifespanManager(app):
            yield
    else:  # pragma: no cover
        async with app.router.lifespan_context(app):
            yield


@contextlib.asynccontextmanager
async def serve(
    engine: FakeEngine,
    settings: Settings | None = None,
    *,
    wait_ready: bool = True,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over ``engine``, lifespan running; waits until /readyz says ready."""
    app = create_app(settings or _settings(), engine=engine)
    async with _lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://ufcal.test") as client:
            if wait_ready:
                for _ in range(200):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the fake engine never became ready")
            yield client
    assert engine.closed, "the lifespan closes the engine on shutdown"


def _one_line(detail: object) -> None:
    assert isinstance(detail, str)
    assert detail
    assert "\n" not in detail
    assert "Traceback" not in detail


# ---------------------------------------------------------------- the response contract


async def test_score_returns_the_whole_contract() -> None:
    engine = white_box()
    async with serve(engine) as client:
        r = await client.post("/score", json={**GOOD, "id": "q-17"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == RESPONSE_FIELDS
    assert body["id"] == "q-17"
    assert body["task"] == "multiple_choice"
    assert body["given"] is None and body["groups"] is None and body["free_form"] is None
    assert body["answer"] == {"index": 3, "label": "D", "text": "delta"}
    assert round(body["confidence"], 5) == 0.19578
    assert body["raw_confidence"] == body["confidence"]  # no calibrator is active
    assert body["calibrator"] is None
    assert round(body["uncertainty"], 5) == 0.55793
    assert list(body["distribution"]) == ["A", "B", "C", "D", "E"]
    assert body["distribution"] == pytest.approx(
        {"A": 0.3, "B": 0.0, "C": 0.1, "D": 0.6, "E": 0.0}, abs=1e-12
    )
    assert list(body["fidelity"]) == ["A", "B", "C", "D", "E"]
    assert round(body["fidelity"]["D"], 5) == 0.44286
    assert body["fidelity"]["B"] == 0.0
    assert sum(body["fidelity"].values()) == pytest.approx(1.0)
    assert body["chains"] == {"A": ["A", "D", "C"], "C": ["C", "A", "D"], "D": ["D", "A", "C"]}
    assert body["method"] == "uf"
    assert body["mode"] == "logprobs"
    assert body["model"] == "fake-model"
    assert set(body["usage"]) == USAGE_FIELDS
    assert body["usage"] == {
        "engine_calls": 4,
        "prompts": 10,
        "unparsed": 0,
        "prompt_tokens": engine.reported_prompt_tokens,
        "completion_tokens": 10,
        "budget_hit": False,
        "dropped_mass": 0.0,
        "chains_cut": 0,
        "max_prompts": 64,
        "budget_fitted": False,
    }
    assert isinstance(body["latency_ms"], float)
    assert body["latency_ms"] >= 0.0


async def test_labels_follow_the_given_order() -> None:
    options = [f"choice {i}" for i in range(7)]
    first = {"G": log(0.7), "B": log(0.3)}
    engine = FakeEngine(letters=chain_script_letters(first, {"B": ["G"]}, 7))
    async with serve(engine) as client:
        r = await client.post("/score", json={"question": "q?", "options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["distribution"]) == list("ABCDEFG")
    assert list(body["fidelity"]) == list("ABCDEFG")
    assert body["answer"] == {"index": 6, "label": "G", "text": "choice 6"}
    assert body["chains"] == {"B": ["B", "G"], "G": ["G"]}
    # the engine saw the options in that order under those letters
    assert engine.calls[0].views[0].options == dict(zip("ABCDEFG", options, strict=True))


async def test_id_is_generated_when_absent() -> None:
    async with serve(white_box()) as client:
        first = (await client.post("/score", json=GOOD)).json()["id"]
        second = (await client.post("/score", json=GOOD)).json()["id"]
    assert isinstance(first, str)
    assert first
    assert first != second


async def test_sampling_mode_and_fidelity_method() -> None:
    samples = ["Because", *FIG3_SAMPLES]
    engine = black_box(samples)
    request = {**GOOD, "mode": "sampling", "samples": 7, "method": "fidelity"}
    async with serve(engine) as client:
        r = await client.post("/score", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "sampling"
    assert body["method"] == "fidelity"
    assert body["usage"]["unparsed"] == 1
    assert body["distribution"] == pytest.approx(
        {"A": 2 / 6, "B": 0.0, "C": 1 / 6, "D": 3 / 6, "E": 0.0}, abs=1e-12
    )
    expected_f = 3 / 6 * 4 / 7 + 2 / 6 * 2 / 7 + 1 / 6 * 1 / 7
    assert body["confidence"] == pytest.approx(expected_f, abs=1e-12)
    assert engine.calls[0].params is not None
    assert engine.calls[0].params[0].n == 7


async def test_auto_mode_on_black_box_engine_samples() -> None:
    async with serve(black_box()) as client:
        r = await client.post("/score", json={**GOOD, "samples": 6})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "sampling"


async def test_request_eps_and_tau_reach_the_scorer() -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "eps": 0.2, "tau": 3.0})
    body = r.json()
    assert r.status_code == 200, r.text
    assert set(body["chains"]) == {"A", "D"}  # C (0.1) is under eps = 0.2
    assert body["fidelity"]["D"] == pytest.approx((0.6 * 27 / 39 + 0.3 * 9 / 39) / 0.9)


# ---------------------------------------------------------------- validation


def _many(n: int) -> list[str]:
    return [f"option {i}" for i in range(n)]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"options": ["only one"]}, "options"),
        ({"options": []}, "options"),
        ({"options": _many(27)}, "options"),
        ({"options": "alpha, beta"}, "options"),
        ({"options": ["alpha", ""]}, "options"),
        ({"options": ["alpha", "   "]}, "options"),
        ({"options": ["alpha", 3]}, "options"),
        ({"question": ""}, "question"),
        ({"question": " \n\t "}, "question"),
        ({"question": None}, "question"),
        ({"samples": "ten"}, "samples"),
        ({"samples": 0}, "samples"),
        ({"samples": 65}, "samples"),
        ({"samples": 2.5}, "samples"),
        ({"mode": "greedy"}, "mode"),
        ({"method": "verb"}, "method"),
        ({"temperature": 0}, "temperature"),
        ({"tau": 0}, "tau"),
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"id": ""}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
async def test_bad_input_is_422_naming_the_field(change: dict[str, Any], field: str) -> None:
    engine = white_box()
    async with serve(engine) as client:
        r = await client.post("/score", json={**GOOD, **change})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert isinstance(errors, list)
    assert errors
    assert all(e["loc"][0] == "body" for e in errors)
    assert field in {e["loc"][1] for e in errors if len(e["loc"]) > 1}
    assert engine.calls == []


@pytest.mark.parametrize("missing", ["question"])  # no options: free-form (test_score_freeform)
async def test_missing_field_is_422(missing: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != missing}
    async with serve(white_box()) as client:
        r = await client.post("/score", json=body)
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", missing]]


async def test_empty_option_error_points_at_the_option() -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "options": ["alpha", "beta", "  "]})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "options", 2]]


async def test_malformed_json_is_422() -> None:
    async with serve(white_box()) as client:
        r = await client.post(
            "/score", content=b'{"question": ', headers={"content-type": "application/json"}
        )
    assert r.status_code == 422


async def test_26_options_are_fine_and_whitespace_is_trimmed() -> None:
    first = {"Z": 0.0}
    engine = FakeEngine(letters=chain_script_letters(first, {}, 26))
    options = [f" option {i} " for i in range(26)]
    async with serve(engine) as client:
        r = await client.post("/score", json={"question": "  q?  ", "options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == {"index": 25, "label": "Z", "text": "option 25"}
    assert len(body["distribution"]) == 26
    assert engine.calls[0].views[0].question == "q?"


# ---------------------------------------------------------------- engine failures


async def test_engine_unavailable_is_503() -> None:
    engine = white_box(fail=EngineUnavailable("engine at http://gpu-1:8000 timed out"))
    async with serve(engine) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 503
    detail = r.json()["detail"]
    _one_line(detail)
    assert "timed out" in detail
    assert r.headers.get("retry-after") == "5"


async def test_engine_error_is_502() -> None:
    engine = white_box(fail=EngineError("vLLM failed: CUDA error"))
    async with serve(engine) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 502
    detail = r.json()["detail"]
    _one_line(detail)
    assert "vLLM failed: CUDA error" in detail


async def test_engine_error_midway_is_502() -> None:
    def fail(call: Any) -> BaseException | None:
        return EngineError("lost the batch") if call.index == 2 else None

    async with serve(white_box(fail=fail)) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 502
    assert r.json() == {"detail": "lost the batch"}


async def test_logprobs_on_black_box_engine_is_400_naming_the_feature() -> None:
    async with serve(black_box()) as client:
        r = await client.post("/score", json={**GOOD, "mode": "logprobs"})
    assert r.status_code == 400
    detail = r.json()["detail"]
    _one_line(detail)
    assert "letter log-probabilities" in detail
    assert "logprobs" in detail


async def test_feature_missing_from_the_engine_is_400() -> None:
    engine = white_box(fail=EngineFeatureMissing("structured output (guided choice)"))
    async with serve(engine) as client:
        r = await client.post("/score", json={**GOOD, "mode": "sampling"})
    assert r.status_code == 400
    detail = r.json()["detail"]
    _one_line(detail)
    assert "structured output (guided choice)" in detail


async def test_unscorable_is_422_saying_nothing_parsed() -> None:
    engine = black_box(["Because", "I think", "", "no idea"])
    async with serve(engine) as client:
        r = await client.post("/score", json={**GOOD, "mode": "sampling", "samples": 4})
    assert r.status_code == 422
    detail = r.json()["detail"]
    _one_line(detail)
    assert detail.startswith("cannot score:")
    assert "none of the 4 sampled replies named an option" in detail


async def test_multiline_engine_error_gives_one_line_detail() -> None:
    message = (
        "vLLM failed: worker died\nTraceback (most recent call last):\n"
        '  File "worker.py", line 1, in run\nRuntimeError: CUDA error'
    )
    async with serve(white_box(fail=EngineError(message))) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 502
    _one_line(r.json()["detail"])


async def test_eps_above_every_probability_is_not_a_500() -> None:
    async with serve(white_box(), raise_app_exceptions=False) as client:
        r = await client.post("/score", json={**GOOD, "eps": 0.9})
    assert r.status_code != 500
    assert r.status_code in (200, 422)


@pytest.mark.parametrize(
    ("setting", "check"),
    [
        ({"mode": "sampling"}, lambda body, engine: body["mode"] == "sampling"),
        ({"samples": 6}, lambda body, engine: engine.calls[0].params[0].n == 6),
        (
            {"temperature": 0.5},
            lambda body, engine: (
                body["distribution"]["D"] == pytest.approx(0.36 / (0.36 + 0.09 + 0.01))
            ),
        ),
        (
            {"tau": 3.0},
            lambda body, engine: (
                body["fidelity"]["D"] == pytest.approx(0.6 * 27 / 39 + 0.3 * 9 / 39 + 0.1 * 3 / 39)
            ),
        ),
    ],
    ids=["mode", "samples", "temperature", "tau"],
)
async def test_settings_method_defaults_apply(
    setting: dict[str, Any], check: Callable[[dict[str, Any], FakeEngine], bool]
) -> None:
    engine = white_box() if "samples" not in setting else black_box()
    async with serve(engine, _settings(**setting)) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 200, r.text
    assert check(r.json(), engine)


# ---------------------------------------------------------------- health and start-up


async def test_healthz_and_readyz() -> None:
    async with serve(white_box()) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"] == "fake-model"


async def test_starting_engine_is_503_until_ready() -> None:
    gate = asyncio.Event()
    engine = white_box(start_event=gate, model="slow-model")
    async with serve(engine, wait_ready=False) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert "starting" in ready.json()["detail"]

        r = await client.post("/score", json=GOOD)
        assert r.status_code == 503
        assert r.headers.get("retry-after") == "5"
        _one_line(r.json()["detail"])
        assert "starting" in r.json()["detail"]
        assert engine.calls == []

        gate.set()
        for _ in range(200):
            ready = await client.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert ready.status_code == 200
        assert ready.json()["model"] == "slow-model"
        r = await client.post("/score", json=GOOD)
        assert r.status_code == 200
        assert r.json()["model"] == "slow-model"


async def test_engine_that_fails_to_start_is_reported() -> None:
    engine = white_box(start_error=EngineUnavailable("no GPU memory left"))
    app = create_app(_settings(), engine=engine)
    async with _lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ufcal.test") as client:
            for _ in range(200):
                ready = await client.get("/readyz")
                if "no GPU memory left" in (ready.json().get("detail") or ""):
                    break
                await asyncio.sleep(0.01)
            assert ready.status_code == 503
            assert ready.json()["detail"] == "EngineUnavailable: no GPU memory left"
            r = await client.post("/score", json=GOOD)
            assert r.status_code == 503
            assert r.headers.get("retry-after") == "5"
            assert "no GPU memory left" in r.json()["detail"]
            assert (await client.get("/healthz")).status_code == 200


async def test_readyz_503_when_engine_goes_down() -> None:
    engine = white_box()
    async with serve(engine) as client:
        engine.healthy = False
        r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert r.json()["detail"] == "engine down"


# ---------------------------------------------------------------- docs


async def test_openapi_and_docs_are_served() -> None:
    async with serve(white_box()) as client:
        spec = await client.get("/openapi.json")
        docs = await client.get("/docs")
    assert spec.status_code == 200
    schema = spec.json()
    assert {"/score", "/healthz", "/readyz"} <= set(schema["paths"])
    request_schema = schema["components"]["schemas"]["ScoreRequest"]
    assert {"question", "options", "mode", "samples"} <= set(request_schema["properties"])
    options = request_schema["properties"]["options"]  # a list, or null: free-form
    lists = [s for s in options["anyOf"] if s.get("type") == "array"]
    assert [s["maxItems"] for s in lists] == [26]
    assert {"type": "null"} in options["anyOf"]
    assert "options" not in request_schema.get("required", [])
    examples = request_schema["examples"]
    assert any("options" not in e for e in examples), "a free-form example"
    assert any("answer" in e and "options" in e for e in examples), "a given option"
    assert "ScoreResponse" in schema["components"]["schemas"]
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "swagger" in docs.text.lower()
