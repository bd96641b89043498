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
    "Recalibrated",
    "Transfer",
    "budget_table",
    "markdown_table",
    "metric_cell",
    "recalibrated",
    "recalibrated_table",
    "reliability_png",
    "summarize",
    "transfer_tables",
    "transfers",
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


def metric_cell(value: float | None) -> str:
    """A metric as a table cell: three decimals, ``-`` for none."""
    return "-" if value is None else f"{value + 0.0:.3f}"  # + 0.0: no "-0.000"


_f = metric_cell  # short, for the table rows below


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


# -- recalibration: cross-fitted in-domain, and transferred across datasets ------------------

#: A recalibrated confidence whose spread is below this is reported as the base rate.
FLAT_SD = 0.02


@dataclass(frozen=True)
class Recalibrated:
    """Raw and cross-fitted recalibrated metrics of one (dataset, method, mode)."""

    dataset: str
    method: str
    mode: str
    n: int
    accuracy: float
    raw: dict[str, float | None]
    cal: dict[str, float | None] | None  # None: below the fit minimum
    cal_sd: float | None


def _scored(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "error" in row or "confidence" not in row:
            continue
        key = (str(row["dataset"]), str(row["method"]), str(row["mode"]))
        groups.setdefault(key, []).append(row)
    return groups


def _metrics(
    conf: Sequence[float], correct: Sequence[bool], n_bins: int
) -> dict[str, float | None]:
    from service.calibration.metrics import confidence_evenness
    from service.calibration.recalibrate import score_metrics

    out = score_metrics(conf, correct, n_bins)
    out["ce"] = confidence_evenness(conf, n_bins)
    return out


def recalibrated(
    summaries: Sequence[GroupSummary],
    rows: Iterable[dict[str, Any]],
    n_bins: int = DEFAULT_N_BINS,
    folds: int = 5,
) -> list[Recalibrated]:
    """For each group of ``summaries``: raw metrics and those of the confidence recalibrated
    by ``folds``-fold cross-fitting within the group (each row's calibrated value comes from
    a calibrator fitted on the other folds, never on the row)."""
    import numpy as np

    from service.calibration.recalibrate import FitPolicy, cross_fit

    groups = _scored(rows)
    policy = FitPolicy(min_labels=2 * folds, min_class=folds, folds=folds)
    out: list[Recalibrated] = []
    for s in summaries:
        group = groups.get((s.dataset, s.method, s.mode), [])
        if not group:
            continue
        conf = [float(r["confidence"]) for r in group]
        correct = [bool(r["correct"]) for r in group]
        cal = cross_fit(conf, correct, policy)
        out.append(
            Recalibrated(
                dataset=s.dataset,
                method=s.method,
                mode=s.mode,
                n=len(group),
                accuracy=sum(correct) / len(correct),
                raw=_metrics(conf, correct, n_bins),
                cal=None if cal is None else _metrics(list(cal), correct, n_bins),
                cal_sd=None if cal is None else float(np.std(cal)),
            )
        )
    return out


def recalibrated_table(items: Sequence[Recalibrated]) -> str:
    """Raw against cross-fitted recalibrated: ECE, CE, Brier, log-loss, AUROC."""
    lines = [
        "| dataset | method | mode | n | accuracy | ECE raw | ECE cal | CE raw | CE cal "
        "| Brier raw | Brier cal | log-loss raw | log-loss cal | AUROC raw | AUROC cal | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in items:
        cal = r.cal or {}
        note = ""
        if r.cal is None:
            note = "too few of a class to fit"
        elif r.cal_sd is not None and r.cal_sd < FLAT_SD:
            note = f"≈ base rate (sd {r.cal_sd:.3f}): the raw score carries no signal here"
        lines.append(
            f"| {r.dataset} | {r.method} | {r.mode} | {r.n} | {_f(r.accuracy)} | "
            f"{_f(r.raw['ece'])} | {_f(cal.get('ece'))} | {_f(r.raw['ce'])} | "
            f"{_f(cal.get('ce'))} | {_f(r.raw['brier'])} | {_f(cal.get('brier'))} | "
            f"{_f(r.raw['log_loss'])} | {_f(cal.get('log_loss'))} | {_f(r.raw['auroc'])} | "
            f"{_f(cal.get('auroc'))} | {note} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Transfer:
    """A calibrator fitted on all of one dataset's rows, applied to another dataset's."""

    method: str
    mode: str
    fitted_on: str
    applied_to: str
    n: int
    raw_ece: float
    cal_ece: float
    raw_brier: float
    cal_brier: float


def transfers(
    rows: Iterable[dict[str, Any]],
    methods: Sequence[str] = (),
    datasets: Sequence[str] = (),
    n_bins: int = DEFAULT_N_BINS,
) -> list[Transfer]:
    """Every ordered pair of datasets for every (method, mode): fit on the first, score the
    second with it (raw against recalibrated ECE and Brier)."""
    from service.calibration.metrics import brier_score, expected_calibration_error
    from service.calibration.recalibrate import FitPolicy, apply_many, fit

    groups = _scored(rows)
    policy = FitPolicy(min_labels=10, min_class=5)
    keys = sorted({(k[1], k[2]) for k in groups}, key=lambda mm: (_rank(mm[0], methods), mm[1]))
    out: list[Transfer] = []
    for method, mode in keys:
        if methods and method not in methods:
            continue
        names = list(
            dict.fromkeys(_order((k[0] for k in groups if k[1:] == (method, mode)), datasets))
        )
        fitted = {}
        for name in names:
            group = groups[(name, method, mode)]
            result = fit(
                [float(r["confidence"]) for r in group], [bool(r["correct"]) for r in group], policy
            )
            if result is not None:
                fitted[name] = result.calibrator
        for source, calibrator in fitted.items():
            for target in names:
                if target == source:
                    continue
                group = groups[(target, method, mode)]
                conf = [float(r["confidence"]) for r in group]
                correct = [bool(r["correct"]) for r in group]
                cal = apply_many(calibrator, conf)
                out.append(
                    Transfer(
                        method=method,
                        mode=mode,
                        fitted_on=source,
                        applied_to=target,
                        n=len(group),
                        raw_ece=expected_calibration_error(conf, correct, n_bins),
                        cal_ece=expected_calibration_error(cal, correct, n_bins),
                        raw_brier=brier_score(conf, correct),
                        cal_brier=brier_score(cal, correct),
                    )
                )
    return out


def _rank(value: str, preferred: Sequence[str]) -> tuple[int, str]:
    return (preferred.index(value) if value in preferred else len(preferred), value)


def transfer_tables(items: Sequence[Transfer], detail: Sequence[str] = ("uf",)) -> str:
    """A summary per (method, mode): on how many dataset pairs the transferred calibrator
    lowered ECE and Brier; then every pair of the ``detail`` methods."""
    lines = [
        "| method | mode | pairs | ECE lower | Brier lower | mean ECE raw | mean ECE cal |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by_key: dict[tuple[str, str], list[Transfer]] = {}
    for t in items:
        by_key.setdefault((t.method, t.mode), []).append(t)
    for (method, mode), group in by_key.items():
        k = len(group)
        lines.append(
            f"| {method} | {mode} | {k} | {sum(t.cal_ece < t.raw_ece for t in group)} | "
            f"{sum(t.cal_brier < t.raw_brier for t in group)} | "
            f"{_f(sum(t.raw_ece for t in group) / k)} | {_f(sum(t.cal_ece for t in group) / k)} |"
        )
    lines += [
        "",
        "| method | mode | fitted on | applied to | n | ECE raw | ECE cal | Brier raw "
        "| Brier cal |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in items:
        if t.method in detail:
            lines.append(
                f"| {t.method} | {t.mode} | {t.fitted_on} | {t.applied_to} | {t.n} | "
                f"{_f(t.raw_ece)} | {_f(t.cal_ece)} | {_f(t.raw_brier)} | {_f(t.cal_brier)} |"
            )
    return "\n".join(lines) + "\n"
