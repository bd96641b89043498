"""Admission's prediction error read off the service's own Prometheus histogram
``ufcal_admission_predicted_over_actual`` (the benchmarks' shared reader)."""

from __future__ import annotations

from typing import Any

METRIC = "ufcal_admission_predicted_over_actual"


def histogram(text: str, name: str = METRIC) -> dict[float, float]:
    """The cumulative bucket counts of one Prometheus histogram, by upper bound."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, linear within its bucket."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    target, lower, below = q * total, 0.0, 0.0
    for bound in sorted(buckets):
        count = buckets[bound]
        if count >= target:
            if bound == float("inf"):
                return lower
            share = (target - below) / (count - below) if count > below else 1.0
            return lower + share * (bound - lower)
        lower, below = bound, count
    return None


def accuracy(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """The prediction's error over the requests observed between two scrapes."""
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = delta.get(float("inf"), 0.0)
    within = delta.get(2.0, 0.0) - delta.get(0.5, 0.0)  # (0.5, 2]
    median, p90 = quantile(delta, 0.5), quantile(delta, 0.9)
    return {
        "observed": int(total),
        "share_within_0.5x_2x": round(within / total, 3) if total else None,
        "median_predicted_over_actual": round(median, 3) if median is not None else None,
        "p90_predicted_over_actual": round(p90, 3) if p90 is not None else None,
    }
