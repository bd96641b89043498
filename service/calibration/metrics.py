"""Calibration metrics over scored answers: pure functions, no I/O.

Every metric takes ``confidences`` (floats in [0, 1]) and ``correct`` (booleans) of equal,
non-zero length. Binned metrics use ``n_bins`` (M) equal-width, right-closed bins over [0, 1]:
bin ``i`` holds confidences in ``(i/M, (i+1)/M]``, except that a confidence of exactly 0 falls
in bin 0.

Metrics (see the method doc):

- accuracy: share of correct answers;
- ECE_M: ``sum_b |b|/N * |acc(b) - conf(b)|``;
- IPR_M (inverse pair ratio): over the K non-empty bins in order of confidence, the share of
  the ``K choose 2`` bin pairs ``i < j`` with ``acc(i) > acc(j)``; 0 when K < 2;
- CE_M (confidence evenness): normalised entropy ``-sum_b p_b ln p_b / ln M`` of the bin
  shares ``p_b = |b|/N`` over all M bins (0 when M == 1);
- Brier score: mean of ``(confidence - correct)^2``;
- AUROC of the confidence for telling correct from wrong answers (ties count half); ``None``
  when every answer is correct or every answer is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_N_BINS",
    "CalibrationReport",
    "ReliabilityBin",
    "accuracy",
    "auroc",
    "bin_index",
    "brier_score",
    "calibration_report",
    "confidence_evenness",
    "expected_calibration_error",
    "inverse_pair_ratio",
    "reliability_bins",
]

DEFAULT_N_BINS = 10

# ``c * M`` within this distance of an integer k is treated as exactly k, so that confidences
# written as decimal bin edges (0.3, 0.7, 0.1 + 0.2, ...) land in the bin they close.
_EDGE_TOLERANCE = 1e-9

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: confidences in ``(lower, upper]``."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True)
class CalibrationReport:
    """All calibration metrics for one set of scored answers."""

    n: int
    accuracy: float
    ece: float
    ipr: float
    ce: float
    brier: float
    auroc: float | None
    bins: tuple[ReliabilityBin, ...]

    def summary(self) -> dict[str, float | int | None]:
        """The scalar metrics, without the bins (JSON-serialisable)."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "ece": self.ece,
            "ipr": self.ipr,
            "ce": self.ce,
            "brier": self.brier,
            "auroc": self.auroc,
        }


# --------------------------------------------------------------------------- validation


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return int(n_bins)


def _as_confidences(confidences: Sequence[float] | FloatArray) -> FloatArray:
    try:
        arr = np.asarray(confidences, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"confidences must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"confidences must be one-dimensional, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("confidences must not be NaN")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        bad = arr[(arr < 0.0) | (arr > 1.0)][0]
        raise ValueError(f"confidences must be in [0, 1], got {float(bad)!r}")
    return arr


def _as_correct(correct: Sequence[bool] | BoolArray) -> BoolArray:
    raw = np.asarray(correct)
    if raw.ndim != 1:
        raise ValueError(f"correct must be one-dimensional, got shape {raw.shape}")
    if raw.dtype == np.bool_:
        return raw
    if raw.size == 0:
        return np.zeros(0, dtype=np.bool_)
    if raw.dtype.kind in "iuf" and np.isin(raw, (0, 1)).all():
        return raw.astype(np.bool_)
    raise ValueError("correct must contain only booleans (or 0/1)")


def _validate(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
) -> tuple[FloatArray, BoolArray]:
    conf = _as_confidences(confidences)
    corr = _as_correct(correct)
    if conf.size != corr.size:
        raise ValueError(f"confidences and correct differ in length ({conf.size} != {corr.size})")
    if conf.size == 0:
        raise ValueError("need at least one scored answer, got none")
    return conf, corr


# ----------------------------------------------------------------------------- binning


def _bin_index(conf: FloatArray, n_bins: int) -> IntArray:
    scaled = conf * n_bins
    nearest = np.rint(scaled)
    snapped = np.where(np.abs(scaled - nearest) <= _EDGE_TOLERANCE, nearest, scaled)
    idx: IntArray = np.ceil(snapped).astype(np.int64) - 1
    np.clip(idx, 0, n_bins - 1, out=idx)
    return idx


def bin_index(confidences: Sequence[float] | FloatArray, n_bins: int = DEFAULT_N_BINS) -> IntArray:
    """Bin of each confidence: ``i`` such that ``c`` is in ``(i/M, (i+1)/M]`` (0 maps to 0).

    Values within 1e-9 / M of a bin edge count as on the edge, so 0.3 lands in bin 2 of 10.
    An empty input gives an empty array.
    """
    m = _check_n_bins(n_bins)
    return _bin_index(_as_confidences(confidences), m)


def _bin_stats(
    conf: FloatArray, corr: BoolArray, n_bins: int
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Per-bin counts, sums of correctness and sums of confidence."""
    idx = _bin_index(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    hits = np.bincount(idx, weights=corr, minlength=n_bins).astype(np.float64)
    conf_sums = np.bincount(idx, weights=conf, minlength=n_bins).astype(np.float64)
    return counts, hits, conf_sums


def _reliability_bins(conf: FloatArray, corr: BoolArray, n_bins: int) -> tuple[ReliabilityBin, ...]:
    counts, hits, conf_sums = _bin_stats(conf, corr, n_bins)
    bins = []
    for i in range(n_bins):
        count = int(counts[i])
        bins.append(
            ReliabilityBin(
                lower=i / n_bins,
                upper=(i + 1) / n_bins,
                count=count,
                accuracy=float(hits[i] / count) if count else None,
                confidence=float(conf_sums[i] / count) if count else None,
            )
        )
    return tuple(bins)


def reliability_bins(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
    n_bins: int = DEFAULT_N_BINS,
) -> tuple[ReliabilityBin, ...]:
    """All M bins with count, accuracy and mean confidence (``None`` for empty bins)."""
    m = _check_n_bins(n_bins)
    conf, corr = _validate(confidences, correct)
    return _reliability_bins(conf, corr, m)


# ----------------------------------------------------------------------------- metrics


def accuracy(correct: Sequence[bool] | BoolArray) -> float:
    """Share of correct answers."""
    corr = _as_correct(correct)
    if corr.size == 0:
        raise ValueError("need at least one scored answer, got none")
    return float(corr.mean())


def _ece(conf: FloatArray, corr: BoolArray, n_bins: int) -> float:
    _, hits, conf_sums = _bin_stats(conf, corr, n_bins)
    # |b|/N * |acc(b) - conf(b)| == |hits(b) - conf_sum(b)| / N; empty bins contribute 0.
    return float(np.abs(hits - conf_sums).sum() / conf.size)


def expected_calibration_error(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
    n_bins: int = DEFAULT_N_BINS,
) -> float:
    """ECE_M = sum over bins of ``|b|/N * |acc(b) - conf(b)|``."""
    m = _check_n_bins(n_bins)
    conf, corr = _validate(confidences, correct)
    return _ece(conf, corr, m)


def _ipr(conf: FloatArray, corr: BoolArray, n_bins: int) -> float:
    counts, hits, _ = _bin_stats(conf, corr, n_bins)
    nonempty = counts > 0
    accs = hits[nonempty] / counts[nonempty]
    k = int(accs.size)
    if k < 2:
        return 0.0
    # Pairs i < j (bins in increasing confidence) whose accuracy goes down: acc(i) > acc(j).
    upper = np.triu(accs[:, None] > accs[None, :], k=1)
    inverse = int(upper.sum())
    return inverse / (k * (k - 1) / 2)


def inverse_pair_ratio(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
    n_bins: int = DEFAULT_N_BINS,
) -> float:
    """IPR_M: share of non-empty bin pairs ``i < j`` with ``acc(i) > acc(j)``; 0 if K < 2."""
    m = _check_n_bins(n_bins)
    conf, corr = _validate(confidences, correct)
    return _ipr(conf, corr, m)


def _ce(conf: FloatArray, n_bins: int) -> float:
    if n_bins == 1:
        return 0.0
    counts = np.bincount(_bin_index(conf, n_bins), minlength=n_bins)
    p = counts[counts > 0] / conf.size
    entropy = float(-(p * np.log(p)).sum())
    # Clamp float noise (e.g. -1e-17 or 1 + 1e-16) into [0, 1].
    return min(max(entropy / math.log(n_bins), 0.0), 1.0)


def confidence_evenness(
    confidences: Sequence[float] | FloatArray,
    n_bins: int = DEFAULT_N_BINS,
) -> float:
    """CE_M = ``-sum_b p_b ln p_b / ln M`` over all M bins (0 ln 0 = 0; 0 when M == 1)."""
    m = _check_n_bins(n_bins)
    conf = _as_confidences(confidences)
    if conf.size == 0:
        raise ValueError("need at least one scored answer, got none")
    return _ce(conf, m)


def _brier(conf: FloatArray, corr: BoolArray) -> float:
    return float(np.mean((conf - corr.astype(np.float64)) ** 2))


def brier_score(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
) -> float:
    """Mean of ``(confidence - correct)^2``."""
    conf, corr = _validate(confidences, correct)
    return _brier(conf, corr)


def _auroc(conf: FloatArray, corr: BoolArray) -> float | None:
    n_pos = int(corr.sum())
    n_neg = int(corr.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U with average ranks for ties (a tie counts half).
    _, inverse, tie_counts = np.unique(conf, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(tie_counts) - tie_counts + 1  # 1-based rank of each unique value
    avg_rank = first_rank + (tie_counts - 1) / 2.0
    ranks = avg_rank[inverse]
    rank_sum = float(ranks[corr].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auroc(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
) -> float | None:
    """AUROC of confidence for separating correct from wrong answers (ties count half).

    ``None`` when all answers are correct or all are wrong (the AUROC is undefined).
    """
    conf, corr = _validate(confidences, correct)
    return _auroc(conf, corr)


def calibration_report(
    confidences: Sequence[float] | FloatArray,
    correct: Sequence[bool] | BoolArray,
    n_bins: int = DEFAULT_N_BINS,
) -> CalibrationReport:
    """Every metric plus the reliability bins, validating the input once."""
    m = _check_n_bins(n_bins)
    conf, corr = _validate(confidences, correct)
    return CalibrationReport(
        n=int(conf.size),
        accuracy=float(corr.mean()),
        ece=_ece(conf, corr, m),
        ipr=_ipr(conf, corr, m),
        ce=_ce(conf, m),
        brier=_brier(conf, corr),
        auroc=_auroc(conf, corr),
        bins=_reliability_bins(conf, corr, m),
    )
