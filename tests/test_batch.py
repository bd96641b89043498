"""POST /score/batch: results in order, per-item errors, the batch size limit."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from service.calibration.prompts import Prompt
from service.engines.base import EngineError
from tests.fakes import FakeCall, FakeEngine, parse_prompt
from tests.test_api import _settings, serve


def _letters(prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
    """A model that always names the option whose text is 'right' and fails on 'boom'."""
    view = parse_prompt(prompt)
    if "boom" in prompt.user:
        raise EngineError("engine exploded\nTraceback: secret")
    right = next((label for label, text in view.options.items() if text == "right"), labels[0])
    return {label: (0.0 if label == right else -5.0) for label in labels}


def _item(question: str, options: list[str]) -> dict[str, object]:
    return {"question": question, "options": options, "id": question}


async def test_results_come_back_in_order_with_per_item_errors() -> None:
    engine = FakeEngine(letters=_letters)
    items = [
        _item("q0", ["right", "wrong"]),
        _item("q1 boom", ["a", "b"]),
        _item("q2", ["wrong", "wrong too", "right"]),
    ]
    async with serve(engine) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["succeeded"] == 2 and body["failed"] == 1
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert results[0]["result"]["id"] == "q0"
    assert results[0]["result"]["answer"]["label"] == "A"
    assert results[2]["result"]["answer"]["label"] == "C"
    assert results[1]["result"] is None
    assert results[1]["error"]["status"] == 502
    assert "\n" not in results[1]["error"]["detail"]


async def test_items_are_in_flight_together() -> None:
    engine = FakeEngine(letters=_letters, delay=0.05)
    items = [_item(f"q{i}", ["right", "wrong"]) for i in range(8)]
    async with serve(engine) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 200
    assert engine.max_in_flight >= 8


async def test_bad_item_is_422_naming_its_position() -> None:
    async with serve(FakeEngine(letters=_letters)) as client:
        r = await client.post(
            "/score/batch", json={"items": [_item("ok", ["a", "b"]), _item("bad", ["a"])]}
        )
    assert r.status_code == 422
    loc = r.json()["detail"][0]["loc"]
    assert loc[:4] == ["body", "items", 1, "options"]


async def test_batch_size_limit_is_422_naming_items() -> None:
    items = [_item(f"q{i}", ["right", "wrong"]) for i in range(4)]
    async with serve(FakeEngine(letters=_letters), _settings(max_batch_size=3)) as client:
        r = await client.post("/score/batch", json={"items": items})
        empty = await client.post("/score/batch", json={"items": []})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "items"]
    assert "UFCAL_MAX_BATCH_SIZE" in r.json()["detail"][0]["msg"]
    assert empty.status_code == 422


async def test_an_item_over_a_limit_is_422_naming_it() -> None:
    items = [_item("ok", ["right", "wrong"]), _item("x" * 50, ["right", "wrong"])]
    async with serve(FakeEngine(letters=_letters), _settings(max_question_chars=20)) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "items", 1, "question"]
    assert "UFCAL_MAX_QUESTION_CHARS" in r.json()["detail"][0]["msg"]


async def test_items_past_the_deadline_are_504_and_the_rest_are_kept() -> None:
    def delay(call: FakeCall) -> float:
        return 5.0 if any("slow" in p.user for p in call.prompts) else 0.0

    engine = FakeEngine(letters=_letters, delay=delay)
    items = [_item("fast", ["right", "wrong"]), _item("slow", ["right", "wrong"])]
    async with serve(engine, _settings(request_timeout_s=0.5)) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["result"]["answer"]["label"] == "A"
    assert results[1]["error"]["status"] == 504
    assert "UFCAL_REQUEST_TIMEOUT_S" in results[1]["error"]["detail"]
    assert engine.in_flight == 0  # the slow item's engine work was cancelled


async def test_a_batch_beyond_capacity_and_queue_is_429() -> None:
    def delay(call: FakeCall) -> float:
        return 1.0 if any("hold" in p.user for p in call.prompts) else 0.0

    engine = FakeEngine(letters=_letters, delay=delay)
    async with serve(engine, _settings(max_concurrency=1, max_queue=0)) as client:
        holder = asyncio.create_task(
            client.post("/score", json={"question": "hold", "options": ["right", "wrong"]})
        )
        while engine.in_flight == 0:
            await asyncio.sleep(0.01)
        r = await client.post("/score/batch", json={"items": [_item("q", ["right", "x"])]})
        assert (await holder).status_code == 200
    assert r.status_code == 429
    assert "Retry-After" in r.headers
