"""POST /score and /score/batch with a given answer and with free-form questions (no
options), over the scriptable fake engines: no vLLM, no sockets."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.responses import JSONResponse

from service.api.common import AppState
from service.api.score.protocol import (
    AnswerNotAnOption,
    ScoreRequest,
    ScoreResponse,
    option_index,
)
from service.api.score.serving import fitted_budget, planned_work, prompt_size_of, score_request
from service.calibration import budget, uf
from service.calibration.freeform import ABSTAIN_OPTION
from service.calibration.recalibrate import Calibrator, apply
from service.config import Settings
from tests.fakes import FakeEngine
from tests.test_api import GOOD, RESPONSE_FIELDS, _settings, black_box, serve, white_box
from tests.test_feedback import _settings as db_settings
from tests.test_recalibration import calibrator_file
from tests.test_scoring_freeform import SAMPLES, WEIGHTS, Model, _judge_calls

FREE = {"question": "What is the capital of France?", "mode": "logprobs", "samples": 5}
GROUP_FIELDS = {
    "label",
    "representative",
    "members",
    "count",
    "confidence",
    "raw_confidence",
    "given",
}
FREEFORM_FIELDS = {
    "samples_taken",
    "samples_usable",
    "judge_prompts",
    "judge_rounds",
    "judge_skipped",
    "dropped_groups",
    "dropped_samples",
    "largest_group_share",
    "semantic_entropy",
    "semantic_entropy_normalized",
    "abstention",
}


def paris_model(**kwargs: Any) -> Model:
    """SAMPLES group as Paris (4: Paris x2, the City of Light, Lutetia) and Rome (1); the
    model is loyal to Paris, then Rome."""
    return Model(SAMPLES, kwargs.pop("weights", WEIGHTS), ranking=["Paris", "Rome"], **kwargs)


def prompts_sent(engine: FakeEngine) -> int:
    return sum(len(c.prompts) for c in engine.calls)


def check_free_form(body: dict[str, Any]) -> None:
    """The shape of every free-form reply, and its numbers agreeing with each other."""
    assert set(body) == RESPONSE_FIELDS
    assert body["task"] == "free_form"
    groups = body["groups"]
    assert groups and all(set(g) == GROUP_FIELDS for g in groups)
    assert set(body["free_form"]) == FREEFORM_FIELDS
    labels = list(body["distribution"])
    abstention = body["free_form"]["abstention"]
    assert [g["label"] for g in groups] == labels[: len(groups)]
    assert len(labels) == len(groups) + (abstention is not None)
    u = body["uncertainty"]
    for g in groups:
        assert 0.0 <= g["confidence"] <= 1.0 and 0.0 <= g["raw_confidence"] <= 1.0
        assert g["raw_confidence"] == pytest.approx((1 - u) * body["fidelity"][g["label"]])
        assert g["members"] and g["count"] >= 0
    answer = body["answer"]
    assert answer["label"] == labels[answer["index"]]
    if answer["index"] < len(groups):
        chosen = groups[answer["index"]]
        assert answer["text"] == chosen["representative"]
        assert body["confidence"] == chosen["confidence"]
        assert body["raw_confidence"] == chosen["raw_confidence"]
    else:
        assert answer["text"] == abstention
    given = body["given"]
    if given is not None:
        group = groups[given["index"]]
        assert group["given"] and sum(g["given"] for g in groups) == 1
        assert given["confidence"] == group["confidence"]
        assert given["raw_confidence"] == group["raw_confidence"]
    else:
        assert not any(g["given"] for g in groups)


# ---------------------------------------------------------------- free-form


async def test_free_form_without_an_answer_is_the_largest_groups_answer() -> None:
    engine = paris_model().engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, "id": "ff-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_free_form(body)
    assert body["id"] == "ff-1" and body["method"] == "uf" and body["mode"] == "logprobs"
    assert body["given"] is None
    assert body["answer"] == {"index": 0, "label": "A", "text": "Paris"}
    assert [(g["representative"], g["count"]) for g in body["groups"]] == [
        ("Paris", 4),
        ("Rome", 1),
    ]
    assert body["groups"][0]["members"] == ["Paris", "the City of Light", "Lutetia"]
    assert body["distribution"] == pytest.approx({"A": 0.7, "B": 0.3})
    u = uf.uncertainty([0.7, 0.3])
    f = uf.fidelity([0.7, 0.3], {0: [0], 1: [1, 0]})
    assert body["confidence"] == pytest.approx((1 - u) * f[0])
    ff = body["free_form"]
    assert ff["samples_taken"] == 5 and ff["samples_usable"] == 5
    assert ff["judge_prompts"] == 3 and ff["judge_rounds"] == 1 and ff["judge_skipped"] == 0
    assert ff["largest_group_share"] == pytest.approx(0.8)
    assert ff["abstention"] is None and ff["dropped_groups"] == 0
    usage = body["usage"]
    assert usage["prompts"] == prompts_sent(engine)  # samples + judge + UF, all counted
    assert usage["engine_calls"] == len(engine.calls)
    assert usage["prompt_tokens"] == engine.reported_prompt_tokens


async def test_free_form_answer_matched_exactly() -> None:
    async with serve(paris_model().engine()) as client:
        r = await client.post("/score", json={**FREE, "answer": "  paris!  "})
    assert r.status_code == 200, r.text
    body = r.json()
    check_free_form(body)
    given = body["given"]
    assert given["answer"] == "  paris!  "  # as given
    assert given["index"] == 0 and given["match"] == "exact"
    assert given["confidence"] == body["confidence"]  # the model's own answer
    assert body["groups"][0]["count"] == 4  # the given answer counts no sample


async def test_free_form_answer_matched_by_the_judge() -> None:
    model = Model([" Paris", " Rome", " Paris"], WEIGHTS, ranking=["Paris", "Rome"])
    engine = model.engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, "samples": 3, "answer": "City of Light"})
    body = r.json()
    check_free_form(body)
    assert body["given"]["match"] == "judge" and body["given"]["index"] == 0
    assert "City of Light" in body["groups"][0]["members"]
    assert _judge_calls(engine) == [2]


async def test_free_form_answer_the_model_never_gives_is_zero() -> None:
    """An answer in no fidelity chain: the model neither picks it nor falls back to it,
    so UF gives it exactly 0 (documented in the answer field and docs/freeform.md)."""
    async with serve(paris_model().engine()) as client:
        r = await client.post("/score", json={**FREE, "answer": "Berlin"})
    body = r.json()
    check_free_form(body)
    given = body["given"]
    assert given["match"] == "absent" and given["index"] == 2
    assert body["groups"][2] == {
        "label": "C",
        "representative": "Berlin",
        "members": ["Berlin"],
        "count": 0,
        "confidence": 0.0,
        "raw_confidence": 0.0,
        "given": True,
    }
    assert given["confidence"] == 0.0
    assert body["answer"]["text"] == "Paris"  # the model's answer is unchanged


async def test_free_form_answer_reached_in_a_chain_is_low_not_zero() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Rome", "Berlin", "Paris"])
    async with serve(model.engine()) as client:
        r = await client.post("/score", json={**FREE, "answer": "Berlin"})
    body = r.json()
    check_free_form(body)
    given = body["given"]
    assert given["match"] == "absent"
    assert 0.0 < given["confidence"] < body["confidence"]


async def test_one_group_gets_the_abstention_as_a_second_option() -> None:
    model = Model([" Paris"] * 3, {"Paris": 0.9, ABSTAIN_OPTION: 0.1}, ranking=["Paris"])
    async with serve(model.engine()) as client:
        r = await client.post("/score", json={**FREE, "samples": 3})
    body = r.json()
    check_free_form(body)
    assert body["free_form"]["abstention"] == ABSTAIN_OPTION
    assert len(body["groups"]) == 1 and list(body["distribution"]) == ["A", "B"]
    assert body["answer"]["text"] == "Paris"


async def test_sampling_mode_on_a_black_box_engine() -> None:
    model = Model(SAMPLES, ranking=["Paris", "Rome"], mc_samples=["Paris"] * 4 + ["Rome"])
    async with serve(model.engine(white_box=False)) as client:
        r = await client.post("/score", json={**FREE, "mode": "auto", "answer": "Rome"})
    body = r.json()
    check_free_form(body)
    assert body["mode"] == "sampling"
    assert body["distribution"] == pytest.approx({"A": 0.8, "B": 0.2})
    assert body["given"]["index"] == 1


async def test_fidelity_method_drops_the_uncertainty_factor() -> None:
    async with serve(paris_model().engine()) as client:
        r = await client.post("/score", json={**FREE, "method": "fidelity", "answer": "Rome"})
    body = r.json()
    assert body["method"] == "fidelity"
    for g in body["groups"]:
        assert g["raw_confidence"] == pytest.approx(body["fidelity"][g["label"]])


async def test_samples_all_unusable_is_the_nothing_to_group_422() -> None:
    engine = Model(["", " ...", "\n\n", " the"]).engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, "samples": 4, "answer": "Paris"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("cannot score: nothing to group")
    assert len(engine.calls) == 1


async def test_free_form_on_an_engine_without_generation_is_400_not_500() -> None:
    async with serve(FakeEngine(letters=white_box()._letters)) as client:
        r = await client.post("/score", json={**FREE})
    assert r.status_code == 400
    assert "generation" in r.json()["detail"]


async def test_budget_binds_the_judge_and_the_reply_says_so() -> None:
    samples = [" Paris", " Rome", " Berlin", " Madrid", " Lisbon"]
    model = Model(samples, {s.strip(): 0.2 for s in samples}, ranking=["Paris"])
    engine = model.engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, "max_prompts": 6})
    body = r.json()
    check_free_form(body)
    assert body["usage"]["budget_hit"] is True and body["usage"]["prompts"] == 6
    assert body["free_form"]["judge_skipped"] > 0 and prompts_sent(engine) == 6


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("answer", [1, "B", "b", " beta ", "beta"])
async def test_a_given_option_by_index_label_or_text(answer: int | str) -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "answer": answer})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "multiple_choice" and body["groups"] is None
    given = body["given"]
    # Fig. 3: B is in no chain, F(B) = 0.
    assert given == {
        "answer": "beta",
        "index": 1,
        "match": "option",
        "confidence": 0.0,
        "raw_confidence": 0.0,
    }
    assert body["answer"]["label"] == "D"  # the model's own answer beside it


@pytest.mark.parametrize("label", ["A", "C", "D"])
async def test_a_given_option_has_its_uf_confidence(label: str) -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "answer": label})
    body = r.json()
    expected = (1 - body["uncertainty"]) * body["fidelity"][label]
    assert body["given"]["raw_confidence"] == pytest.approx(expected)
    assert body["given"]["confidence"] == body["given"]["raw_confidence"]  # no calibrator
    if label == "D":  # the model's answer: exactly its confidence
        assert body["given"]["confidence"] == body["confidence"]


async def test_a_given_option_under_the_sampled_and_token_baselines() -> None:
    async with serve(black_box()) as client:
        r = await client.post("/score", json={**GOOD, "method": "sampled", "answer": "A"})
    body = r.json()
    assert body["given"]["raw_confidence"] == pytest.approx(body["distribution"]["A"])
    async with serve(white_box()) as client:
        r = await client.post("/score", json={**GOOD, "method": "token", "answer": 0})
    body = r.json()
    assert body["given"]["raw_confidence"] == pytest.approx(0.3)  # exp(log 0.3)


async def test_the_calibrator_maps_the_given_and_the_groups(tmp_path: Path) -> None:
    mc_file = calibrator_file(tmp_path / "cal.json")  # no task: multiple_choice
    ff_file = calibrator_file(tmp_path / "ff.json", task="free_form")
    settings = db_settings(tmp_path / "u.db", calibrators=f"{mc_file},{ff_file}")
    expected = Calibrator("platt", {"a": 0.5, "b": -1.0})
    async with serve(white_box(), settings) as client:
        mc = (await client.post("/score", json={**GOOD, "answer": "A"})).json()
    async with serve(paris_model().engine(), settings) as client:
        ff = (await client.post("/score", json={**FREE, "answer": "Rome"})).json()
    for body in (mc, ff):
        assert body["calibrator"] == {"version": 1, "kind": "platt", "labels": 300}
        given = body["given"]
        assert given["confidence"] == pytest.approx(apply(expected, given["raw_confidence"]))
        assert given["confidence"] != given["raw_confidence"]
    for g in ff["groups"]:
        assert g["confidence"] == pytest.approx(apply(expected, g["raw_confidence"]))
    check_free_form(ff)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"answer": 5}, "answer", "0..4"),
        ({"answer": -1}, "answer", "A..E"),
        ({"answer": "F"}, "answer", "not an option"),
        ({"answer": "Alpha"}, "answer", "exact text"),
        ({"answer": ""}, "answer", "not an option"),
        ({"answer": True}, "answer", ""),
        ({"answer": 2.5}, "answer", ""),
        ({"answer": ["alpha"]}, "answer", ""),
        ({"answer": "A", "method": "verbalized"}, "method", "own answer"),
        ({"answer": 0, "method": "linguistic"}, "method", "own answer"),
        ({"options": ["b", "a"], "answer": "a"}, "answer", "ambiguous"),
    ],
)
async def test_bad_multiple_choice_answer_is_422(
    change: dict[str, Any], field: str, words: str
) -> None:
    engine = white_box()
    async with serve(engine) as client:
        r = await client.post("/score", json={**GOOD, **change})
    assert r.status_code == 422, r.text
    issues = r.json()["detail"]
    assert field in {e["loc"][1] for e in issues if e["loc"][:1] == ["body"]}
    assert any(words in e["msg"] for e in issues)
    assert engine.calls == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"method": "sampled"}, "method", "uf, fidelity"),
        ({"method": "token", "answer": "Paris"}, "method", "free-form"),
        ({"method": "verbalized"}, "method", "free-form"),
        ({"answer": 0}, "answer", "text"),
        ({"answer": ""}, "answer", "empty"),
        ({"answer": " ?!. "}, "answer", "empty"),
        ({"answer": "The"}, "answer", "empty"),
        ({"answer": "x" * 2001}, "answer", "UFCAL_MAX_OPTION_CHARS"),
        ({"max_prompts": 2}, "max_prompts", "free-form question needs"),
        ({"options": None, "max_prompts": 1}, "max_prompts", "3 prompts"),
    ],
)
async def test_bad_free_form_request_is_422(change: dict[str, Any], field: str, words: str) -> None:
    engine = paris_model().engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, **change})
    assert r.status_code == 422, r.text
    issues = r.json()["detail"]
    assert [e["loc"] for e in issues] == [["body", field]]
    assert words in issues[0]["msg"]
    assert engine.calls == []


async def test_the_free_form_minimum_budget_is_accepted() -> None:
    engine = paris_model().engine()
    async with serve(engine) as client:
        r = await client.post("/score", json={**FREE, "max_prompts": 3, "answer": "Rome"})
    assert r.status_code == 200, r.text
    assert prompts_sent(engine) <= 3 and r.json()["usage"]["budget_hit"]


async def test_score_request_called_directly_checks_the_joint_rules() -> None:
    """The chat proxy calls score_request with a body it built: a bad answer is the same
    422, never a 500."""
    async with serve(paris_model().engine()) as client:
        transport: Any = client._transport
        state: AppState = transport.app.state.ufcal
        body = ScoreRequest(question="q?", options=["x", "y"], answer=7)
        reply = await score_request(state, body)
    assert isinstance(reply, JSONResponse) and reply.status_code == 422
    assert [e["loc"] for e in json.loads(bytes(reply.body))["detail"]] == [["body", "answer"]]


async def test_openapi_has_free_form_examples() -> None:
    async with serve(white_box()) as client:
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    requests = [ScoreRequest.model_validate(e) for e in schemas["ScoreRequest"]["examples"]]
    assert [r.task for r in requests].count("free_form") >= 1
    assert [e["task"] for e in schemas["ScoreResponse"]["examples"]] == ["free_form"]
    # The served copy leaves out the nulls; the model's own is whole and valid.
    (example,) = ScoreResponse.model_json_schema()["examples"]
    check_free_form(ScoreResponse.model_validate(example).model_dump(mode="json"))


def test_option_index_rules() -> None:
    options = ["alpha", "beta", "C"]
    assert option_index(options, 2) == 2
    assert option_index(options, "b") == 1
    assert option_index(options, " beta\n") == 1
    assert option_index(options, "C") == 2  # label C and text C agree
    assert option_index(options, "c") == 2
    with pytest.raises(AnswerNotAnOption, match=r"A\.\.C"):
        option_index(options, "D")
    with pytest.raises(AnswerNotAnOption, match="ambiguous"):
        option_index(["B", "A"], "A")


# ---------------------------------------------------------------- batch


async def test_batch_mixes_tasks_with_and_without_answers() -> None:
    engine = paris_model().engine()
    items = [
        {**FREE, "id": "f0"},
        {"question": "Pick one", "options": ["Paris", "Rome"], "answer": "Rome", "id": "m1"},
        {**FREE, "answer": "Berlin", "id": "f2"},
        {"question": "Pick one", "options": ["Paris", "Rome"], "id": "m3"},
    ]
    async with serve(engine) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["succeeded"] == 4 and body["failed"] == 0
    results = [x["result"] for x in body["results"]]
    assert [x["task"] for x in results] == [
        "free_form",
        "multiple_choice",
        "free_form",
        "multiple_choice",
    ]
    check_free_form(results[0])
    check_free_form(results[2])
    assert results[0]["given"] is None and results[2]["given"]["match"] == "absent"
    assert results[1]["given"]["index"] == 1 and results[3]["given"] is None


async def test_batch_item_with_a_bad_answer_is_422_naming_it() -> None:
    items = [
        {**FREE, "answer": "Paris"},
        {**GOOD, "answer": "Z"},
        {**FREE, "method": "token"},
    ]
    engine = paris_model().engine()
    async with serve(engine) as client:
        r = await client.post("/score/batch", json={"items": items})
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["detail"]]
    assert locs == [["body", "items", 1, "answer"], ["body", "items", 2, "method"]]
    assert engine.calls == []


# ---------------------------------------------------------------- admission, store, logs


def test_freeform_planned_prompts() -> None:
    # K = 10 with a given answer: 11 candidates, 55 pairs, UF over 11 options (111).
    assert budget.freeform_planned_prompts("uf", 10, 0, given=True) == 1 + 55 + 1 + 11 * 10
    assert budget.freeform_planned_prompts("uf", 10, 0) == 1 + 45 + 1 + 10 * 9
    assert budget.freeform_planned_prompts("uf", 10, 0, judge_prompts_per_pair=0) == 1 + 91
    assert budget.freeform_planned_prompts("uf", 1, 0) == 1 + 0 + 1 + 2  # + the abstention
    # 30 candidates: UF over 26 at most.
    assert budget.freeform_planned_prompts("uf", 30, 0) == 1 + 435 + 1 + 26 * 25
    assert budget.freeform_planned_prompts("uf", 10, 64) == 64  # the budget caps it
    assert budget.freeform_planned_prompts("uf", 10, 1) == 3  # never below the minimum
    assert budget.freeform_planned_prompts("uf", 1, 64, given=False) == 4
    assert budget.freeform_min_prompts("uf") == 3


def test_planned_work_weighs_free_form_by_its_plan() -> None:
    settings = _settings()
    free = ScoreRequest(question="q?", samples=4, max_prompts=1000)  # not binding
    assert planned_work(free, settings) == budget.freeform_planned_prompts("uf", 4, 0) == 20
    given = ScoreRequest(question="q?", answer="a", max_prompts=1000)
    assert planned_work(given, settings) == budget.freeform_planned_prompts(
        "uf", settings.samples, 0, given=True
    )
    assert planned_work(ScoreRequest(question="q?"), settings) == 64  # the default budget
    nli = Settings(_env_file=None, freeform_nli_model=Path("/nowhere"))  # type: ignore[call-arg]
    assert planned_work(free, nli) == budget.freeform_planned_prompts(
        "uf", 4, 0, judge_prompts_per_pair=0
    )
    mc = ScoreRequest(question="q?", options=["a", "b"], answer="a")
    assert planned_work(mc, settings) == budget.planned_prompts("uf", 2, 64)


def test_free_form_prompt_size() -> None:
    # UF over up to K short answers (and the given one): K = 4 is a standard-ish prompt.
    four = budget.freeform_prompt_size(120, 4, None)
    assert four == pytest.approx(budget.prompt_size(120, [40] * 4))
    assert budget.freeform_prompt_size(120, 4, 500) == pytest.approx(
        budget.prompt_size(120, [40] * 4 + [500])
    )
    assert budget.freeform_prompt_size(120, 64, None) == pytest.approx(
        budget.prompt_size(120, [40] * 26)
    )
    assert budget.freeform_prompt_size(120, 1, None) == pytest.approx(
        budget.prompt_size(120, [40] * 2)
    )


def test_a_fitted_default_budget_keeps_the_free_form_minimum() -> None:
    class Tight:
        def prompts_within(
            self, seconds: float, size: float = 1.0, share: float | None = None
        ) -> int:
            return 1  # the engine is so slow that one prompt fits the deadline

    state: Any = SimpleNamespace(settings=_settings(), admission=Tight())
    free = ScoreRequest(question="q?")
    assert fitted_budget(state, free, 20.0, 1.0) == budget.freeform_min_prompts("uf") == 3
    mc = ScoreRequest(question="q?", options=["a", "b", "c", "d"])
    assert fitted_budget(state, mc, 20.0, 1.0) == 2
    assert fitted_budget(state, ScoreRequest(question="q?", max_prompts=5), 20.0, 1.0) is None
    assert prompt_size_of(free, state.settings) == pytest.approx(
        budget.freeform_prompt_size(len(b"q?"), state.settings.samples, None)
    )


async def test_a_free_form_reply_says_its_budget() -> None:
    async with serve(paris_model().engine()) as client:
        usage = (await client.post("/score", json={**FREE, "max_prompts": 9})).json()["usage"]
    assert usage["max_prompts"] == 9 and usage["budget_fitted"] is False
    assert usage["prompts"] <= 9


async def test_feedback_judges_the_given_free_form_answer(tmp_path: Path) -> None:
    settings = db_settings(tmp_path / "u.db", log_text=True)
    async with serve(paris_model().engine(), settings) as client:
        scored = (await client.post("/score", json={**FREE, "id": "ff", "answer": "Rome"})).json()
        plain = (await client.post("/score", json={**FREE, "id": "ff-plain"})).json()
        await client.post("/score", json={**FREE, "id": "ff-3", "answer": "Berlin"})
        r = await client.post("/feedback", json={"id": "ff", "correct": False})
        g = await client.post("/feedback", json={"id": "ff-plain", "gold_index": 0})
        out_of_range = await client.post("/feedback", json={"id": "ff-3", "gold_index": 3})
        recent = (await client.get("/scores")).json()
    assert r.status_code == 201, r.text
    assert r.json()["answer_index"] == scored["given"]["index"] == 1
    assert r.json()["confidence"] == pytest.approx(scored["given"]["confidence"])
    assert g.status_code == 201 and g.json()["correct"] is True  # group 0 is the answer
    assert g.json()["confidence"] == pytest.approx(plain["confidence"])
    # ff-3's options: Paris, Rome, then the given answer's own group: 3 in all.
    assert out_of_range.status_code == 422
    assert out_of_range.json()["detail"][0]["loc"] == ["body", "gold_index"]
    with sqlite3.connect(tmp_path / "u.db") as db:
        rows = dict(
            (row[0], row[1:])
            for row in db.execute(
                "SELECT id, n_options, options, answer_index, raw_confidence FROM scores"
            )
        )
    assert rows["ff"][:3] == (2, json.dumps(["Paris", "Rome"]), 1)
    assert rows["ff"][3] == pytest.approx(scored["given"]["raw_confidence"])
    assert rows["ff-3"][:3] == (3, json.dumps(["Paris", "Rome", "Berlin"]), 2)
    assert {s["id"] for s in recent["scores"]} >= {"ff", "ff-plain", "ff-3"}


async def test_the_log_line_says_the_task(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ufcal.score")
    async with serve(paris_model().engine()) as client:
        await client.post("/score", json={**FREE, "answer": "Rome"})
        await client.post(
            "/score", json={"question": "Pick", "options": ["Paris", "Rome"], "answer": 0}
        )
    fields = [getattr(r, "fields", {}) for r in caplog.records if r.name == "ufcal.score"]
    scored = [f for f in fields if f.get("status") == 200]
    assert [f["task"] for f in scored] == ["free_form", "multiple_choice"]
    assert scored[0]["given"]["match"] == "exact"
    assert scored[1]["given"]["index"] == 0


async def test_a_configured_nli_judge_groups_without_engine_prompts(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_scoring_freeform import _tiny_nli

    path = _tiny_nli(tmp_path / "nli", 5.0)  # entails everything: one group
    settings = _settings(freeform_nli_model=path)
    model = Model([" Paris", " Rome"], {"Paris": 0.9, ABSTAIN_OPTION: 0.1}, ranking=["Paris"])
    engine = model.engine()
    async with serve(engine, settings) as client:
        r = await client.post("/score", json={**FREE, "samples": 2})
    body = r.json()
    check_free_form(body)
    assert body["free_form"]["judge_prompts"] == 0 and _judge_calls(engine) == []
    assert body["groups"][0]["members"] == ["Paris", "Rome"]
