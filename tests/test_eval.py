"""ufcal eval: data selection and permutation, the resumable results file, the runner
(interrupted and resumed), the summary table and the reliability diagrams. Fake engine only."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service.calibration import baselines
from service.calibration.prompts import Prompt, PromptTemplate
from service.cli import build_parser
from service.engines.base import EngineError, GenerationParams
from service.evaluation import command as eval_cmd
from service.evaluation.data import Item, load_mcqa, load_selection, permute, select
from service.evaluation.report import markdown_table, summarize, write_figures
from service.evaluation.results import ResultsFile, read_rows, row_key
from service.evaluation.runner import run_eval
from service.scoring import METHODS, ScoreParams
from tests.fakes import FakeCall, FakeEngine, log, parse_prompt

TEMPLATE = PromptTemplate()
VOLATILE = {"run", "run_started", "finished", "latency_ms"}


def _write_mcqa(path: Path, n: int, dataset: str = "toy", subjects: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            row = {
                "id": f"q{i}",
                "dataset": dataset,
                "subject": f"s{i % subjects}" if subjects else None,
                "question": f"Question number {i}?",
                "options": [f"gold {i}", f"second {i}", f"third {i}", f"fourth {i}"],
                "answer": 0,
            }
            handle.write(json.dumps(row) + "\n")
    return path


def _letters(prompt: Prompt, labels: Sequence[str]) -> dict[str, float]:
    """Deterministic: prefers the option whose text starts with "gold" on even questions,
    the one with "second" on odd ones; chains go back to the start after one step."""
    view = parse_prompt(prompt)
    number = int(view.question.split()[2].rstrip("?"))
    target = "gold" if number % 2 == 0 else "second"
    if view.substituted is None:
        return {
            lab: (log(0.6) if text.startswith(target) else log(0.1))
            for lab, text in view.options.items()
        }
    return {view.substituted: 0.0}


def _generate(prompt: Prompt, params: GenerationParams) -> list[str]:
    if prompt.answer_prefix == baselines.VERBALIZED_ANSWER_PREFIX:
        return [" 0.6"]
    if prompt.answer_prefix == baselines.LINGUISTIC_ANSWER_PREFIX:
        return [" Likely"]
    view = parse_prompt(prompt)
    if view.substituted is None:
        gold = next(lab for lab, text in view.options.items() if text.startswith("gold"))
        other = "B" if gold == "A" else "A"
        return [f" {gold}"] * 6 + [f" {other}"] * (params.n - 6)
    return [f" {view.substituted}"]


def _engine(**kwargs: Any) -> FakeEngine:
    return FakeEngine(letters=_letters, generate=_generate, **kwargs)


def _stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=row_key)


def _usage_free(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "usage"} for r in _stable(rows)]


# ------------------------------------------------------------------------------ data


def test_select_per_subject_then_limit_in_file_order(tmp_path: Path) -> None:
    items = load_mcqa(_write_mcqa(tmp_path / "m.jsonl", 20, subjects=4))
    chosen = select(items, per_subject=2)
    assert [i.id for i in chosen] == [f"q{i}" for i in range(8)]
    assert [i.id for i in select(items, limit=3, per_subject=2)] == ["q0", "q1", "q2"]
    assert len(select(items)) == 20
    # A smaller selection is part of a larger one (runs can be extended and resumed).
    assert {i.id for i in select(items, per_subject=1)} <= {i.id for i in chosen}


def test_permutation_is_fixed_and_moves_the_gold(tmp_path: Path) -> None:
    items = load_mcqa(_write_mcqa(tmp_path / "t.jsonl", 40))
    once = [permute(i, 0) for i in items]
    again = [permute(i, 0) for i in items]
    assert once == again
    for original, shown in zip(items, once, strict=True):
        assert shown.options[shown.answer] == original.options[original.answer]
        assert sorted(shown.options) == sorted(original.options)
        assert [original.options[j] for j in shown.perm] == list(shown.options)
    # The gold was always first; after permuting it is spread over the positions.
    assert len({s.answer for s in once}) == 4
    assert [permute(i, 1) for i in items] != once


def test_load_reports_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "question": "q", "options": ["a", "b"], "answer": 5}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_mcqa(path)


# ---------------------------------------------------------------------- results file


def _row(i: int, method: str = "uf") -> dict[str, Any]:
    return {"dataset": "d", "id": str(i), "method": method, "mode": "logprobs", "x": i}


def test_results_file_appends_once_per_key_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with ResultsFile(path) as results:
        results.append(_row(1))
        results.append(_row(1))  # same key: not written twice
        results.append(_row(2))
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as handle:
        handle.write('{"dataset": "d", "id": "3", "meth')  # died mid-write
    assert [r["id"] for r in read_rows(path)] == ["1", "2"]
    reopened = ResultsFile(path)
    assert reopened.done == {("d", "1", "uf", "logprobs"), ("d", "2", "uf", "logprobs")}
    assert path.read_text().endswith("\n")
    with reopened:
        reopened.append(_row(3))
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["1", "2", "3"]


def test_results_file_refuses_damage_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row(1)) + "\nnot json\n" + json.dumps(_row(2)) + "\n")
    with pytest.raises(ValueError, match="middle"):
        ResultsFile(path)


# ---------------------------------------------------------------------------- runner


def _items(tmp_path: Path, n: int = 12) -> list[Item]:
    return load_selection([_write_mcqa(tmp_path / "toy.jsonl", n)], None, None, seed=0)


def _run(items: list[Item], engine: FakeEngine, path: Path, **kwargs: Any) -> Any:
    async def go() -> Any:
        with ResultsFile(path) as results:
            return await run_eval(
                items,
                list(METHODS),
                engine,
                TEMPLATE,
                ScoreParams(mode="logprobs"),
                results,
                progress=False,
                **kwargs,
            )

    return asyncio.run(go())


def test_uninterrupted_run_writes_every_key_once(tmp_path: Path) -> None:
    items = _items(tmp_path)
    stats = _run(items, _engine(), tmp_path / "full.jsonl", concurrency=4)
    rows = read_rows(tmp_path / "full.jsonl")
    assert stats.written == len(rows) == len(items) * len(METHODS)
    assert len({row_key(r) for r in rows}) == len(rows)
    for row in rows:
        assert row["correct"] == (row["answer"] == row["gold"])
        assert 0.0 <= row["confidence"] <= 1.0
    sampled = [r for r in rows if r["method"] == "sampled"]
    assert {r["mode"] for r in sampled} == {"sampling"}
    assert all(r["confidence"] == pytest.approx(0.6) for r in sampled)


def test_interrupted_run_resumes_to_the_same_results_without_duplicates(tmp_path: Path) -> None:
    items = _items(tmp_path)
    full_path = tmp_path / "full.jsonl"
    _run(items, _engine(), full_path, concurrency=3)

    # Interrupted: the engine breaks after 20 calls (every later call fails).
    broken = _engine(fail=lambda call: EngineError("engine died") if call.index >= 20 else None)
    part_path = tmp_path / "part.jsonl"
    stats = _run(items, broken, part_path, concurrency=3)
    partial = read_rows(part_path)
    assert stats.failed > 0 and 0 < len(partial) < len(items) * len(METHODS)
    # ... and the process died mid-write of the next line.
    with part_path.open("a") as handle:
        handle.write('{"dataset": "toy", "id": "q')

    engine = _engine()
    resumed = _run(items, engine, part_path, concurrency=3)
    assert resumed.failed == 0
    assert resumed.skipped == len({r["id"] for r in partial if _complete(partial, r["id"])})
    rows = read_rows(part_path)
    assert len(rows) == len({row_key(r) for r in rows}) == len(items) * len(METHODS)
    # Rows written before and after the interruption are the same as an uninterrupted run's.
    assert _usage_free(rows) == _usage_free(read_rows(full_path))
    # Questions already complete were not sent to the engine again.
    done_ids = {r["id"] for r in partial if _complete(partial, r["id"])}
    asked = {parse_prompt(p).question for c in engine.calls for p in c.prompts}
    for item in items:
        if item.id in done_ids:
            assert item.question not in asked


def _complete(rows: list[dict[str, Any]], item_id: str) -> bool:
    return len({r["method"] for r in rows if r["id"] == item_id}) == len(METHODS)


def test_a_rerun_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    items = _items(tmp_path, 4)
    path = tmp_path / "r.jsonl"
    _run(items, _engine(), path)
    engine = _engine()
    stats = _run(items, engine, path)
    assert stats.skipped == 4 and stats.written == 0 and engine.calls == []


def test_questions_are_in_flight_together(tmp_path: Path) -> None:
    items = _items(tmp_path, 8)
    engine = _engine(delay=0.01)
    _run(items, engine, tmp_path / "r.jsonl", concurrency=8)
    assert engine.max_in_flight >= 8


# ---------------------------------------------------------------------------- report


def test_table_and_figures(tmp_path: Path) -> None:
    items = _items(tmp_path, 10)
    path = tmp_path / "r.jsonl"
    _run(items, _engine(), path)
    rows = read_rows(path)
    rows.append({**_row(99, "verbalized"), "dataset": "toy", "error": "no number"})
    summaries = summarize(rows, list(METHODS))
    assert [s.method for s in summaries] == list(METHODS)
    table = markdown_table(summaries)
    assert table.splitlines()[0].startswith("| dataset | method | mode | n | unscorable")
    assert len(table.splitlines()) == 2 + len(METHODS)
    verbal = next(s for s in summaries if s.method == "verbalized")
    assert verbal.unscorable == 1 and verbal.report is not None and verbal.report.n == 10
    token = next(s for s in summaries if s.method == "token")
    assert token.report is not None and token.report.accuracy == pytest.approx(0.5)
    paths = write_figures(summaries, tmp_path / "fig")
    assert len(paths) == len(METHODS)
    for png in paths:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 60_000


def test_eval_command_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _write_mcqa(data / "toy.jsonl", 6)
    engine = _engine()
    notes = tmp_path / "notes.md"
    notes.write_text("## Notes\n\nHand-written scope.\n")

    async def build(settings: Any) -> FakeEngine:
        return engine

    monkeypatch.setattr("service.engines.build_engine", build)
    out = tmp_path / "out" / "results.jsonl"
    argv = [
        "eval",
        "toy.jsonl",
        "--data-dir",
        str(data),
        "--methods",
        "uf,token,linguistic",
        "--limit",
        "5",
        "--out",
        str(out),
        "--figures",
        str(tmp_path / "docs" / "figures"),
        "--report",
        str(tmp_path / "docs" / "results.md"),
        "--notes",
        str(notes),
        "--no-progress",
    ]
    args = build_parser().parse_args(argv)
    assert isinstance(args, argparse.Namespace)
    assert eval_cmd.eval_command(args, argv[1:]) == 0
    printed = capsys.readouterr().out
    assert "| toy | uf | logprobs | 5 |" in printed
    assert "| toy | linguistic | logprobs | 5 |" in printed
    assert len(read_rows(out)) == 15
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "ufcal eval toy.jsonl --data-dir" in report
    assert "](figures/reliability_toy_uf_logprobs.png)" in report
    assert "## Notes\n\nHand-written scope." in report
    assert "wall time" in report and "| toy | linguistic | logprobs | 5 | 0 | 1.000 |" in report
    assert len(list((tmp_path / "docs" / "figures").glob("*.png"))) == 3
    # Summarising again without running reads the same file.
    engine.calls.clear()
    args = build_parser().parse_args([*argv, "--no-run"])
    assert eval_cmd.eval_command(args, argv[1:]) == 0
    assert engine.calls == []


def test_unknown_method_is_refused(tmp_path: Path) -> None:
    from service.cli_args import ArgumentError
    from service.evaluation.arguments import _methods

    with pytest.raises(ArgumentError, match="--methods: unknown method"):
        _methods("uf,nope")


def test_wall_time_sums_the_runs() -> None:
    rows = [
        {"run": "a", "run_started": 0.0, "finished": 10.0},
        {"run": "a", "run_started": 0.0, "finished": 30.0},
        {"run": "b", "run_started": 100.0, "finished": 105.0},
    ]
    assert eval_cmd.wall_time_s(rows) == pytest.approx(35.0)


def test_fake_call_type_is_importable() -> None:
    assert FakeCall.__name__ == "FakeCall"


def test_metrics_file_skips_unscorable_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.evaluation.metrics_file import metrics_command

    path = tmp_path / "scored.jsonl"
    path.write_text(
        '{"confidence": 0.9, "correct": true}\n'
        '{"id": "2", "error": "cannot score"}\n'
        '{"confidence": 0.2, "correct": false}\n'
    )
    assert metrics_command(str(path), 10) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 2
    assert "1 unscorable" in captured.err


def test_a_file_can_override_the_limit(tmp_path: Path) -> None:
    from service.evaluation.data import split_limit

    assert split_limit("a.jsonl:30") == ("a.jsonl", 30)
    assert split_limit("a.jsonl:all") == ("a.jsonl", "all")
    assert split_limit("a.jsonl") == ("a.jsonl", None)
    assert split_limit("C:/x.jsonl") == ("C:/x.jsonl", None)
    first = _write_mcqa(tmp_path / "a.jsonl", 10, dataset="a")
    second = _write_mcqa(tmp_path / "b.jsonl", 10, dataset="b")
    items = load_selection([first, (second, "all")], 3, None, seed=0)
    assert [i.dataset for i in items] == ["a"] * 3 + ["b"] * 10
    items = load_selection([(first, 5), second], 3, None, seed=0)
    assert [i.dataset for i in items] == ["a"] * 5 + ["b"] * 3
