"""``ufcal eval --freeform`` on the real engine: two ARC-Challenge questions without their
options and two rungs of the arithmetic ladder, through a real vLLM server serving the
embedded SmolLM2 (UFCAL_ENGINE_URL), grouped by the engine's own judge. Checks the four
rows per question, their agreement with the samples they share, and the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.evaluation.freeform import FREEFORM_CONFIDENCES, grade_answer
from service.evaluation.results import read_rows
from tests.servers import EMBEDDED_NAME, ROOT, SHARED_DATA, ServerProcess

pytestmark = pytest.mark.integration


def test_freeform_eval_on_real_questions(vllm: ServerProcess, tmp_path: Path) -> None:
    if not (SHARED_DATA / "arc_challenge_test.jsonl").is_file():
        pytest.fail(f"evaluation data missing: {SHARED_DATA}")
    argv = [
        sys.executable, "-m", "service.cli", "eval", "arc_challenge_test.jsonl:2",
        "arithmetic:1", "--freeform", "--levels", "add1,mul21", "--data-dir", str(SHARED_DATA),
        "--out", str(tmp_path / "results.jsonl"), "--report", str(tmp_path / "ff.md"),
        "--no-progress", "--no-recalibration",
    ]  # fmt: skip
    env = {**os.environ, "UFCAL_ENGINE_URL": vllm.base_url}
    done = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 4 * len(FREEFORM_CONFIDENCES)
    assert {r["dataset"] for r in rows} == {"arc_challenge-freeform", "arithmetic"}
    by_question: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_question.setdefault(str(row["id"]), []).append(row)
    for group in by_question.values():
        assert sorted(str(r["method"]) for r in group) == sorted(FREEFORM_CONFIDENCES)
        scored = [r for r in group if "error" not in r]
        if not scored:
            continue
        uf = next(r for r in scored if r["method"] == "uf")
        assert uf["model"] == EMBEDDED_NAME and uf["mode"] == "logprobs"
        assert len(uf["samples"]) == 10  # type: ignore[arg-type]
        assert uf["correct"] == grade_answer(str(uf["answer"]), str(uf["reference"]))
        for row in scored:
            assert 0.0 <= float(row["confidence"]) <= 1.0  # type: ignore[arg-type]
            assert row["samples"] == uf["samples"] and row["usage"] == uf["usage"]
    report = (tmp_path / "ff.md").read_text()
    assert "## Accuracy per rung" in report and "## Cost per question" in report
    assert "| arithmetic | 2 mul21 | 1 |" in report or "arithmetic | uf" in report
