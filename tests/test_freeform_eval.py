"""``ufcal eval --freeform``: the datasets (MCQA without options, the arithmetic ladder),
grading, the rows of one scored question, the resumable runner, the argument checks and
the report's tables. Fake engine only."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from service.calibration import freeform as ff
from service.calibration.prompts import Prompt
from service.cli import build_parser
from service.cli_args import ArgumentError
from service.config import Settings
from service.engines.base import GenerationParams
from service.evaluation import command as eval_cmd
from service.evaluation.arguments import check_eval_arguments, check_freeform_arguments
from service.evaluation.freeform import (
    FREEFORM_CONFIDENCES,
    FreeformItem,
    arithmetic_items,
    confidence_rows,
    grade_answer,
    load_freeform_mcqa,
    refers_to_options,
    run_freeform_eval,
)
from service.evaluation.freeform_report import cost_table, dataset_wall_s, level_table
from service.evaluation.results import ResultsFile, read_rows
from service.scoring import ScoreParams, Unscorable
from service.scoring_freeform import ExactOnlyJudge, FreeformContext, score_freeform
from tests.fakes import FakeEngine, log, parse_prompt

_SUM = re.compile(r"What is (\d+) \+ (\d+)\?")


def _sum(question: str) -> tuple[int, bool]:
    """The right sum, and whether the scripted model gets it right (even a: yes)."""
    m = _SUM.search(question)
    assert m is not None, question
    a, b = int(m.group(1)), int(m.group(2))
    return a + b, a % 2 == 0


def _generate(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
    """Samples: 6 of one number (right when a is even, else off by one), 3 of the
    other, one unusable reply. A plain (sampling-mode) reply names the first option."""
    if prompt.answer_prefix == ff.SAMPLE_PREFIX:
        total, right = _sum(prompt.user)
        major, minor = (total, total + 1) if right else (total + 1, total)
        texts = [f" {major}."] * 6 + [f" {minor}"] * 3 + [" ..."]
        return texts[: params.n]
    return [" A"] * params.n


def _letters(prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
    """Step 1 puts 0.7 on the first option (the largest group); chains stay loyal."""
    view = parse_prompt(prompt)
    if view.substituted is None:
        rest = 0.3 / max(1, len(labels) - 1)
        return {lab: log(0.7 if i == 0 else rest) for i, lab in enumerate(labels)}
    return {view.substituted: 0.0}


def _engine() -> FakeEngine:
    return FakeEngine(letters=_letters, generate=_generate)


PARAMS = ScoreParams(mode="logprobs", samples=10)
CONTEXT = FreeformContext(judge=ExactOnlyJudge())


def _write_mcqa(path: Path) -> Path:
    specs = [
        ("q0", "Capital of France?", ["Rome", "Paris"], 1),
        ("q1", "Pick one.", ["x", "All of the above"], 1),
        ("q2", "2 + 2?", ["4", "5"], 0),
        ("q3", "Sky?", [" Blue ", "Red"], 0),
    ]
    rows = [
        {"id": i, "dataset": "toy", "question": q, "options": o, "answer": a}
        for i, q, o, a in specs
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    ("text", "refers"),
    [
        ("All of the above", True),
        ("none of these", True),
        ("Both A and B", True),
        ("(A) and (C)", True),
        ("Neither", True),
        ("Paris", False),
        ("Above the clouds", False),
        ("A cat and a dog", False),
    ],
)
def test_refers_to_options(text: str, refers: bool) -> None:
    assert refers_to_options(text) is refers


def test_mcqa_without_options_keeps_the_gold_text_as_reference(tmp_path: Path) -> None:
    items = load_freeform_mcqa(_write_mcqa(tmp_path / "toy.jsonl"))
    assert [i.id for i in items] == ["q0", "q2", "q3"]  # "All of the above" is left out
    assert [i.reference for i in items] == ["Paris", "4", "Blue"]
    assert {i.dataset for i in items} == {"toy-freeform"}  # never an MC row's key
    assert items[0].question == "Capital of France?" and items[0].level is None
    assert [i.id for i in load_freeform_mcqa(tmp_path / "toy.jsonl", limit=2)] == ["q0", "q2"]


def test_arithmetic_items_carry_the_rung() -> None:
    items = arithmetic_items(["add1", "mul21"], per_level=3, seed=5)
    assert len(items) == 6
    assert [(i.level, i.level_name) for i in items[::3]] == [(1, "add1"), (2, "mul21")]
    assert all(i.dataset == "arithmetic" and i.reference.isdigit() for i in items)
    assert items == arithmetic_items(["add1", "mul21"], per_level=3, seed=5)


@pytest.mark.parametrize(
    ("prediction", "reference", "right"),
    [
        (" 15.", "15", True),
        ("7 + 8 = 15", "15", True),
        ("15.0", "15", True),
        ("1,234", "1234", True),
        ("16", "15", False),
        ("fifteen", "15", False),
        (" the Paris.", "Paris", True),
        ("Paris, France", "Paris", False),
        ('"Blue"', "blue", True),
        ("", "Blue", False),
    ],
)
def test_grading_by_value_or_normalised_match(prediction: str, reference: str, right: bool) -> None:
    assert grade_answer(prediction, reference) is right


# ------------------------------------------------------------------------------ rows


def _score(question: str) -> Any:
    return asyncio.run(score_freeform(question, _engine(), PARAMS, context=CONTEXT))


def test_one_question_gives_four_rows_on_the_same_samples() -> None:
    item = FreeformItem("arithmetic", "arith-add1-000", "What is 4 + 3?", "7", level=1)
    result = _score(item.question)
    rows = confidence_rows(item, result, FREEFORM_CONFIDENCES, "logprobs", "run1", 0.0)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(FREEFORM_CONFIDENCES)
    assert by["uf"]["answer"] == "7" and by["uf"]["correct"] is True
    assert by["uf"]["confidence"] == pytest.approx(result.confidence)
    assert by["fidelity"]["confidence"] == pytest.approx(result.uf.fidelity[result.uf.answer])
    assert by["largest_share"]["confidence"] == pytest.approx(6 / 9)  # of the usable samples
    entropy = -(6 / 9) * math.log(6 / 9) - (3 / 9) * math.log(3 / 9)
    assert by["semantic_entropy"]["confidence"] == pytest.approx(1 - entropy / math.log(9))
    assert by["uf"]["samples_correct"] == 6 and by["uf"]["groups"] == [["7", 6], ["8", 3]]
    assert all(r["usage"]["prompts"] == result.usage.prompts for r in rows)
    assert by["uf"]["judge_prompts"] == 0  # exact grouping only


def test_wrong_largest_group_is_graded_wrong() -> None:
    item = FreeformItem("arithmetic", "x", "What is 3 + 3?", "6", level=1)
    rows = confidence_rows(item, _score(item.question), ["uf", "largest_share"], "m", "r", 0.0)
    assert [(r["answer"], r["correct"]) for r in rows] == [("7", False), ("7", False)]


def test_an_unscorable_question_writes_error_rows() -> None:
    item = FreeformItem("arithmetic", "x", "What is 3 + 3?", "6")
    rows = confidence_rows(item, Unscorable("nothing to group"), ["uf", "fidelity"], "m", "r", 0)
    assert [r["method"] for r in rows] == ["uf", "fidelity"]
    assert all(r["error"] == "nothing to group" and "confidence" not in r for r in rows)


# ------------------------------------------------------------------------------ runner


def test_runner_writes_every_confidence_once_and_resumes(tmp_path: Path) -> None:
    items = arithmetic_items(["add1", "add21"], per_level=4, seed=1)
    engine = _engine()
    with ResultsFile(tmp_path / "r.jsonl") as results:
        stats = asyncio.run(
            run_freeform_eval(
                items, FREEFORM_CONFIDENCES, engine, CONTEXT, PARAMS, results, progress=False
            )
        )
    assert stats.written == 4 * len(items) and stats.failed == 0
    rows = read_rows(tmp_path / "r.jsonl")
    assert len(rows) == 4 * len(items)
    assert {r["mode"] for r in rows} == {"logprobs"}
    # One sampling request per question, however many confidences.
    samples = [c for c in engine.calls if c.prompts[0].answer_prefix == ff.SAMPLE_PREFIX]
    assert len(samples) == len(items)
    with ResultsFile(tmp_path / "r.jsonl") as results:
        again = asyncio.run(
            run_freeform_eval(
                items, FREEFORM_CONFIDENCES, engine, CONTEXT, PARAMS, results, progress=False
            )
        )
    assert again.skipped == len(items) and again.written == 0
    assert len(read_rows(tmp_path / "r.jsonl")) == 4 * len(items)


# ------------------------------------------------------------------------------ arguments


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["eval", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["arithmetic", "--freeform", "--levels", "add1,nope"], "--levels: unknown rung 'nope'"),
        (["arithmetic"], "FILES: arithmetic is a free-form dataset"),
        (["arithmetic", "--freeform", "--methods", "token"], "--methods: unknown free-form"),
        (["arithmetic:all", "--freeform"], "FILES: arithmetic:N"),
        (["arithmetic:0", "--freeform"], "FILES: arithmetic:N needs N >= 1"),
        (["arithmetic", "--freeform", "--judge", "nli"], "--judge: nli needs"),
        (["nope.jsonl", "--freeform"], "FILES: no such MCQA file"),
    ],
)
def test_bad_freeform_arguments_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ArgumentError, match=re.escape(message)):
        check_eval_arguments(_args(*argv), Settings())


def test_freeform_only_flags_are_refused_without_freeform(tmp_path: Path) -> None:
    data = _write_mcqa(tmp_path / "toy.jsonl")
    with pytest.raises(ArgumentError, match="--judge: only with --freeform"):
        check_eval_arguments(_args(str(data), "--judge", "exact"), Settings())
    with pytest.raises(ArgumentError, match="--levels: only with `arithmetic`"):
        check_eval_arguments(_args(str(data), "--freeform", "--levels", "add1"), Settings())


def test_freeform_selection(tmp_path: Path) -> None:
    data = _write_mcqa(tmp_path / "toy.jsonl")
    sel = check_freeform_arguments(
        _args(str(data), "arithmetic:7", "--freeform", "--levels", "add2,add1"), Settings()
    )
    assert sel.arithmetic and sel.per_level == 7 and sel.levels == ["add2", "add1"]
    assert [p for p, _ in sel.paths] == [data]
    assert sel.methods == list(FREEFORM_CONFIDENCES)


def test_bad_per_level_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args("arithmetic", "--freeform", "--per-level", "0")
    assert "--per-level" in capsys.readouterr().err


# ------------------------------------------------------------------------------ report


def _row(dataset: str, qid: str, method: str, correct: bool, conf: float, **kw: Any) -> Any:
    return {
        "dataset": dataset,
        "id": qid,
        "method": method,
        "mode": "logprobs",
        "correct": correct,
        "confidence": conf,
        "run": "r",
        "run_started": 0.0,
        "finished": 10.0,
        **kw,
    }


def test_level_and_cost_tables() -> None:
    cost = {"usage": {"prompts": 5, "engine_calls": 3}, "judge_prompts": 2, "uf_prompts": 2}
    rows = [
        _row("arithmetic", "a", "uf", True, 0.8, level=1, level_name="add1", samples=["1"] * 10,
             samples_correct=7, latency_ms=2000.0, groups=[["1", 7]], **cost),
        _row("arithmetic", "a", "largest_share", True, 0.7, level=1, level_name="add1"),
        _row("arithmetic", "b", "uf", False, 0.2, level=2, level_name="mul1", samples=["1"] * 10,
             samples_correct=1, latency_ms=4000.0, groups=[["1", 2], ["2", 1]], **cost),
        _row("arithmetic", "b", "largest_share", True, 0.4, level=2, level_name="mul1"),
    ]  # fmt: skip
    table = level_table(rows)
    assert "| arithmetic | 1 add1 | 1 | 1.000 | 1.000 | 0.700 | 0.800 | 0.700 | - |" in table
    assert "| arithmetic | 2 mul1 | 1 | 0.000 | 1.000 | 0.100 | 0.200 | 0.400 | - |" in table
    assert dataset_wall_s(rows) == {"arithmetic": 10.0}
    costs = cost_table(rows, {"arithmetic": 10.0})
    assert "| arithmetic | 2 | 5.0 | 2.0 | 2.0 | 3.0 | 0 | 0 | 1.5 | 4.0 | 5.00 |" in costs


def test_freeform_eval_command_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine()

    async def build(settings: Any) -> FakeEngine:
        return engine

    monkeypatch.setattr("service.engines.build_engine", build)
    out = tmp_path / "results.jsonl"
    argv = [
        "eval",
        "arithmetic:6",
        "--freeform",
        "--levels",
        "add1,add21",
        "--judge",
        "exact",
        "--out",
        str(out),
        "--report",
        str(tmp_path / "ff.md"),
        "--no-progress",
    ]
    args = build_parser().parse_args(argv)
    assert eval_cmd.eval_command(args, argv[1:]) == 0
    printed = capsys.readouterr().out
    assert "| arithmetic | uf | logprobs | 12 |" in printed
    assert "| arithmetic | semantic_entropy | logprobs | 12 |" in printed
    assert len(read_rows(out)) == 4 * 12
    report = (tmp_path / "ff.md").read_text()
    assert "ufcal eval arithmetic:6 --freeform" in report
    assert "## Accuracy per rung" in report and "| arithmetic | 2 add21 | 6 |" in report
    assert "## Cost per question" in report and "judge: exact" in report
    # --no-run reads the file back and starts no engine.
    engine.calls.clear()
    assert eval_cmd.eval_command(build_parser().parse_args([*argv, "--no-run"]), argv[1:]) == 0
    assert engine.calls == []


# ------------------------------------------------------------------------------ bench


def test_bench_variant_f_beside_multiple_choice_uf() -> None:
    from service.bench.runner import format_table, freeform_cost, run_engine_variants, stats_rows
    from service.calibration.prompts import PromptTemplate, Question

    questions = [Question(f"What is {a} + 3?", ("1", "2", "3", "4")) for a in range(2, 6)]
    results = asyncio.run(
        run_engine_variants(
            _engine(),
            questions,
            PromptTemplate(),
            variants=("b", "c", "f"),
            concurrency=2,
            judge=ExactOnlyJudge(),
        )
    )
    f = results["f"]
    assert f.failed == 0 and f.judge_prompts == 0 and f.prompts > len(questions)
    cost = freeform_cost(results)
    assert cost is not None
    assert set(cost["engine_s_per_q"]) == {"f", "b", "c"}
    assert set(cost["time_ratio"]) == {"f/b", "f/c"}
    assert cost["judge_prompts_per_q"] == 0.0
    rows = {r["variant"]: r for r in stats_rows(results)}
    assert rows["f"]["judge_prompts_per_q"] == 0.0 and rows["b"]["judge_prompts_per_q"] == 0.0
    report = {"engine": "fake", "model": "m", "n": 4, "dataset": "d"}
    report.update(variants=list(rows.values()), freeform_cost=cost)
    assert "free-form (f) against 4-option multiple-choice UF" in format_table(report)
    assert freeform_cost({k: v for k, v in results.items() if k != "f"}) is None


def test_the_queue_interleaves_the_rungs() -> None:
    from service.evaluation.freeform import interleave_lanes

    items = arithmetic_items(["add1", "mul1", "add2"], per_level=2, seed=0)
    order = interleave_lanes([(i, ["uf"]) for i in items])
    assert [i.level_name for i, _ in order] == ["add1", "mul1", "add2"] * 2
