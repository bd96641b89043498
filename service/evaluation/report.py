"""Summaries of a results file: a Markdown table and reliability diagrams (PNG).

Rows are grouped by (dataset, method, mode). Metrics are computed over the scored rows; rows
with ``error`` (the model named no option, or stated no confidence) are counted as
``unscorable`` and left out of the metrics, never given a made-up confidence."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.calibration.metrics import DEFAULT_N_BINS, CalibrationReport, calibration_report

__all__ = [
    "GroupSummary",
    "budget_table",
    "markdown_table",
    "reliability_png",
    "summarize",
    "write_figures",
]


@dataclass(frozen=True)
class GroupSummary:
    """Metrics of one (dataset, method, mode)."""

    dataset: str
    method: str
    mode: str
    rows: int
    unscorable: int
    report: CalibrationReport | None
    mean_prompts: float
    mean_engine_calls: float
    budget_hits: int = 0  # questions the work budget bound (usage.budget_hit)
    mean_dropped_mass: float = 0.0  # share of the start set's mass the budget dropped


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def summarize(
    rows: Iterable[dict[str, Any]],
    methods: Sequence[str] = (),
    datasets: Sequence[str] = (),
    n_bins: int = DEFAULT_N_BINS,
) -> list[GroupSummary]:
    """One summary per (dataset, method, mode), datasets and methods in the given order
    (others after, sorted). Empty ``methods`` / ``datasets`` keep every group."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (str(row["dataset"]), str(row["method"]), str(row["mode"]))
        if (methods and key[1] not in methods) or (datasets and key[0] not in datasets):
            continue
        groups.setdefault(key, []).append(row)
    out: list[GroupSummary] = []
    for dataset in _order((k[0] for k in groups), datasets):
        for method in _order((k[1] for k in groups if k[0] == dataset), methods):
            for mode in sorted(k[2] for k in groups if k[:2] == (dataset, method)):
                group = groups[(dataset, method, mode)]
                scored = [r for r in group if "error" not in r]
                report = (
                    calibration_report(
                        [float(r["confidence"]) for r in scored],
                        [bool(r["correct"]) for r in scored],
                        n_bins=n_bins,
                    )
                    if scored
                    else None
                )
                usages = [r.get("usage") or {} for r in group]
                out.append(
                    GroupSummary(
                        dataset=dataset,
                        method=method,
                        mode=mode,
                        rows=len(group),
                        unscorable=len(group) - len(scored),
                        report=report,
                        mean_prompts=sum(u.get("prompts", 0) for u in usages) / len(group),
                        mean_engine_calls=sum(u.get("engine_calls", 0) for u in usages)
                        / len(group),
                        budget_hits=sum(1 for u in usages if u.get("budget_hit")),
                        mean_dropped_mass=sum(float(u.get("dropped_mass", 0.0)) for u in usages)
                        / len(group),
                    )
                )
    return out


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value + 0.0:.3f}"  # + 0.0: no "-0.000"


def markdown_table(summaries: Sequence[GroupSummary]) -> str:
    """dataset x method: n, unscorable, accuracy, ECE, IPR, CE, Brier, AUROC, prompts/q."""
    lines = [
        "| dataset | method | mode | n | unscorable | accuracy | ECE | IPR | CE | Brier | AUROC "
        "| prompts/q |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        r = s.report
        if r is None:
            metrics = "0 | " + str(s.unscorable) + " | - | - | - | - | - | -"
        else:
            metrics = (
                f"{r.n} | {s.unscorable} | {_f(r.accuracy)} | {_f(r.ece)} | {_f(r.ipr)} | "
                f"{_f(r.ce)} | {_f(r.brier)} | {_f(r.auroc)}"
            )
        lines.append(f"| {s.dataset} | {s.method} | {s.mode} | {metrics} | {s.mean_prompts:.1f} |")
    return "\n".join(lines) + "\n"


def budget_table(summaries: Sequence[GroupSummary], max_prompts: int) -> str:
    """How often the work budget bound, per (dataset, method, mode) that runs chains."""
    lines = [
        f"| dataset | method | mode | questions | budget bound (max {max_prompts or 'none'}) "
        "| share | mean dropped mass |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        if s.method not in ("uf", "fidelity"):
            continue
        share = s.budget_hits / s.rows if s.rows else 0.0
        lines.append(
            f"| {s.dataset} | {s.method} | {s.mode} | {s.rows} | {s.budget_hits} | "
            f"{share:.3f} | {s.mean_dropped_mass:.4f} |"
        )
    return "\n".join(lines) + "\n"


def figure_name(summary: GroupSummary) -> str:
    """File name of a group's reliability diagram."""
    return f"reliability_{summary.dataset}_{summary.method}_{summary.mode}.png"


def reliability_png(summary: GroupSummary, path: str | Path) -> None:
    """Accuracy per confidence bin against the diagonal, with the bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = summary.report
    fig, ax = plt.subplots(figsize=(3.4, 3.4), dpi=72)
    try:
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1)
        if report is not None:
            width = report.bins[0].upper - report.bins[0].lower
            for b in report.bins:
                if b.count == 0 or b.accuracy is None:
                    continue
                ax.bar(
                    b.lower,
                    b.accuracy,
                    width=width,
                    align="edge",
                    color="tab:blue",
                    edgecolor="white",
                    alpha=0.8,
                )
                ax.text(
                    b.lower + width / 2,
                    min(b.accuracy, 0.9) + 0.02,
                    str(b.count),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
            ax.set_title(
                f"{summary.dataset} / {summary.method}\n"
                f"n={report.n} ECE={report.ece:.3f} IPR={report.ipr:.2f} CE={report.ce + 0.0:.2f}",
                fontsize=7,
            )
        else:
            ax.set_title(f"{summary.dataset} / {summary.method}: nothing scored", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (bin)", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=72)
    finally:
        plt.close(fig)


def write_figures(summaries: Sequence[GroupSummary], directory: str | Path) -> list[Path]:
    """One reliability diagram per (dataset, method, mode); returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in summaries:
        path = directory / figure_name(s)
        reliability_png(s, path)
        paths.append(path)
    return paths
