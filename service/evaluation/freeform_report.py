"""Tables of a free-form evaluation: accuracy per rung, cost per question, and the report.

The calibration tables themselves are the multiple-choice ones (``report.markdown_table``,
``report.recalibrated_table``): a free-form row has the same ``confidence``/``correct``
fields, one row per confidence (``freeform.FREEFORM_CONFIDENCES``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.evaluation.report import (
    GroupSummary,
    Recalibrated,
    markdown_table,
    metric_cell,
    recalibrated_table,
)

__all__ = ["cost_table", "level_table", "render_freeform_report"]

_f = metric_cell


def _questions(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """One scored row per (dataset, id): the ``uf`` row where there is one (every row of a
    question carries the question's samples and cost)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if "error" in row:
            continue
        key = (str(row["dataset"]), str(row["id"]))
        if key not in out or row["method"] == "uf":
            out[key] = row
    return out


def level_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per dataset and rung: questions, accuracy of UF's answer and of the largest group's,
    the share of right samples, and the mean confidence of each method."""
    by_level: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "error" in row or row.get("level") is None:
            continue
        key = (str(row["dataset"]), int(row["level"]), str(row.get("level_name") or ""))
        by_level.setdefault(key, []).append(row)
    lines = [
        "| dataset | rung | n | accuracy (UF answer) | accuracy (largest group) | right samples "
        "| mean conf uf | mean conf largest_share | mean conf semantic_entropy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, level, name), group in sorted(by_level.items()):
        per_method: dict[str, list[dict[str, Any]]] = {}
        for row in group:
            per_method.setdefault(str(row["method"]), []).append(row)
        questions = _questions(group)
        n = len(questions)

        def acc(method: str, by: dict[str, list[dict[str, Any]]] = per_method) -> float | None:
            g = by.get(method, [])
            return sum(bool(r["correct"]) for r in g) / len(g) if g else None

        def mean_conf(
            method: str, by: dict[str, list[dict[str, Any]]] = per_method
        ) -> float | None:
            g = by.get(method, [])
            return sum(float(r["confidence"]) for r in g) / len(g) if g else None

        taken = sum(len(r.get("samples") or []) for r in questions.values())
        right = sum(int(r.get("samples_correct", 0)) for r in questions.values())
        lines.append(
            f"| {dataset} | {level} {name} | {n} | {_f(acc('uf'))} | {_f(acc('largest_share'))} "
            f"| {_f(right / taken if taken else None)} | {_f(mean_conf('uf'))} "
            f"| {_f(mean_conf('largest_share'))} | {_f(mean_conf('semantic_entropy'))} |"
        )
    return "\n".join(lines) + "\n"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def cost_table(rows: Sequence[dict[str, Any]], wall_s: dict[str, float]) -> str:
    """Per dataset: what one free-form question cost (all four confidences come from it):
    prompts, of which judge prompts and UF prompts, engine calls, tokens, latency, and the
    engine seconds per question (the run's wall time over its questions, ``wall_s`` by
    dataset; every question of a run shares the engine, so this is the throughput cost)."""
    lines = [
        "| dataset | questions | prompts/q | judge prompts/q | UF prompts/q | engine calls/q "
        "| prompt tok/q | completion tok/q | groups/q | p50 latency s | engine s/q |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for (dataset, _), row in _questions(rows).items():
        by_dataset.setdefault(dataset, []).append(row)
    for dataset, group in by_dataset.items():
        usage = [r.get("usage") or {} for r in group]
        latency = sorted(float(r.get("latency_ms", 0.0)) / 1000.0 for r in group)
        n = len(group)
        per_q = wall_s.get(dataset, 0.0) / n if n else 0.0
        lines.append(
            f"| {dataset} | {n} | {_mean([u.get('prompts', 0) for u in usage]):.1f} "
            f"| {_mean([r.get('judge_prompts', 0) for r in group]):.1f} "
            f"| {_mean([r.get('uf_prompts', 0) for r in group]):.1f} "
            f"| {_mean([u.get('engine_calls', 0) for u in usage]):.1f} "
            f"| {_mean([u.get('prompt_tokens', 0) for u in usage]):.0f} "
            f"| {_mean([u.get('completion_tokens', 0) for u in usage]):.0f} "
            f"| {_mean([len(r.get('groups') or []) for r in group]):.1f} "
            f"| {latency[n // 2] if latency else 0.0:.1f} | {per_q:.2f} |"
        )
    return "\n".join(lines) + "\n"


def dataset_wall_s(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each dataset's share of the runs' wall time: a run's span (start to its last row)
    split over the datasets in proportion to the questions each had in it."""
    spans: dict[str, tuple[float, float]] = {}
    counts: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        run = str(row.get("run", ""))
        start = float(row.get("run_started", row.get("finished", 0.0)))
        end = float(row.get("finished", start))
        lo, hi = spans.get(run, (start, end))
        spans[run] = (min(lo, start), max(hi, end))
        counts.setdefault(run, {}).setdefault(str(row["dataset"]), set()).add(str(row["id"]))
    out: dict[str, float] = {}
    for run, (lo, hi) in spans.items():
        total = sum(len(ids) for ids in counts[run].values())
        for dataset, ids in counts[run].items():
            out[dataset] = out.get(dataset, 0.0) + (hi - lo) * len(ids) / total
    return out


def render_freeform_report(
    command: str,
    summaries: Sequence[GroupSummary],
    rows: Sequence[dict[str, Any]],
    setup: Sequence[str],
    recal: Sequence[Recalibrated] = (),
    notes: str = "",
) -> str:
    """The Markdown report of a free-form evaluation."""
    out = [
        "# Free-form calibration results",
        "",
        "Produced by (from the repository root):",
        "",
        "```sh",
        command,
        "```",
        "",
        *[f"- {line}" for line in setup],
        "",
        *([notes.strip(), ""] if notes.strip() else []),
        "## Metrics (raw)",
        "",
        "One free-form question is scored once; its four rows share the samples. `uf` and "
        "`fidelity` grade UF's answer (its chosen group), `largest_share` and "
        "`semantic_entropy` the largest group's (their confidence: the group's share of the "
        "usable samples; 1 - normalised semantic entropy over the groups). `unscorable`: "
        "no usable sample, or the UF part could not be scored.",
        "",
        markdown_table(summaries),
    ]
    if recal:
        out += [
            "## Recalibrated (5-fold cross-fitting within each dataset)",
            "",
            "As in the multiple-choice report: each row's calibrated value comes from a "
            "calibrator (Platt, beta or isotonic, chosen by inner cross-validated log-loss) "
            "fitted on the other folds.",
            "",
            recalibrated_table(recal),
        ]
    if any(r.get("level") is not None for r in rows):
        out += ["## Accuracy per rung", "", level_table(rows)]
    out += [
        "## Cost per question",
        "",
        "Everything one question cost (its four confidences come from it). `engine s/q`: the "
        "run's wall time over its questions, with the questions in flight together.",
        "",
        cost_table(rows, dataset_wall_s(rows)),
    ]
    return "\n".join(out)
