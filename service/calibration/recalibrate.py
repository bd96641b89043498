"""Recalibration: a monotone map from a method's raw score to P(correct), fitted from
labelled (score, correct) pairs. Pure functions over arrays and JSON-able parameters.

Three kinds, each non-decreasing in the score, so a fitted map never reorders answers (AUROC
can only move by the ties it makes):

- ``platt``: ``sigmoid(a * logit(s) + b)`` with ``a >= 0`` (Platt scaling on the logit of the
  clipped score);
- ``beta``: ``sigmoid(a * ln s - b * ln(1 - s) + c)`` with ``a, b >= 0`` (beta calibration,
  Kull et al. 2017: a logistic fit on ``ln s`` and ``-ln(1 - s)``; a negative coefficient
  is dropped and the fit repeated without it, as the paper does, to stay monotone);
- ``isotonic``: a non-decreasing step map (isotonic regression), interpolated linearly
  between its knots, only with enough labels (``isotonic_min`` and ``isotonic_min_class``).

Fitting uses scikit-learn (LogisticRegression, IsotonicRegression, StratifiedKFold); the
kind is chosen by 5-fold cross-validated log-loss. Applying a calibrator (``apply``) is a few
float operations over the stored parameters: no scikit-learn on the request path.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from service.calibration.metrics import auroc, brier_score, expected_calibration_error

__all__ = [
    "KINDS",
    "Calibrator",
    "CalibratorError",
    "FitPolicy",
    "FitResult",
    "RefitDecision",
    "apply",
    "apply_many",
    "cap_sources",
    "cross_fit",
    "fit",
    "fit_kind",
    "log_loss",
    "refit",
    "score_metrics",
]

Kind = Literal["platt", "beta", "isotonic"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: Scores are clipped to [SCORE_CLIP, 1 - SCORE_CLIP] before a logit or a log.
SCORE_CLIP = 1e-6
#: Calibrated probabilities stay in [PROB_CLIP, 1 - PROB_CLIP]: a calibrator fitted on a few
#: hundred labels has no business saying 0 or 1, and log-loss stays finite.
PROB_CLIP = 1e-3
#: Effectively unregularised logistic fits (the data are 1-2 features, hundreds of rows).
_LOGISTIC_C = 1e4

FloatArray = npt.NDArray[np.float64]
#: Right (True / 1) or wrong (False / 0) per score.
Labels = Sequence[bool] | npt.NDArray[Any]


class CalibratorError(ValueError):
    """Calibrator parameters that cannot be applied (unknown kind, wrong or non-finite
    values, a decreasing map)."""


@dataclass(frozen=True)
class Calibrator:
    """A fitted map: its kind and its parameters (JSON-able, validated on construction)."""

    kind: Kind
    params: Mapping[str, Any]
    _knots: tuple[tuple[float, ...], tuple[float, ...]] = field(
        default=((), ()), repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CalibratorError(f"unknown calibrator kind {self.kind!r}; one of {KINDS}")
        if not isinstance(self.params, Mapping):
            raise CalibratorError("params must be an object")
        if self.kind == "isotonic":
            x, y = _floats(self.params, "x"), _floats(self.params, "y")
            if len(x) != len(y) or not x:
                raise CalibratorError("isotonic: x and y must be non-empty and of equal length")
            if any(b < a for a, b in itertools.pairwise(x)):
                raise CalibratorError("isotonic: x must be sorted")
            if any(b < a for a, b in itertools.pairwise(y)):
                raise CalibratorError("isotonic: y must be non-decreasing")
            if any(not 0.0 <= v <= 1.0 for v in (*x, *y)):
                raise CalibratorError("isotonic: x and y must lie in [0, 1]")
            object.__setattr__(self, "_knots", (tuple(x), tuple(y)))
            return
        names = ("a", "b") if self.kind == "platt" else ("a", "b", "c")
        if set(self.params) != set(names):
            raise CalibratorError(f"{self.kind}: params must be exactly {', '.join(names)}")
        values = {n: _finite(self.params, n) for n in names}
        if values["a"] < 0 or (self.kind == "beta" and values["b"] < 0):
            raise CalibratorError(f"{self.kind}: a negative slope would reverse the ranking")

    def to_json(self) -> dict[str, Any]:
        """``{"kind", "params"}``: what is stored (never a pickle)."""
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: Any) -> Calibrator:
        """Rebuild from :meth:`to_json` output; ``CalibratorError`` if it is not valid."""
        if not isinstance(data, Mapping) or "kind" not in data or "params" not in data:
            raise CalibratorError("a calibrator needs 'kind' and 'params'")
        return cls(data["kind"], data["params"])


def _finite(params: Mapping[str, Any], name: str) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CalibratorError(f"parameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def _floats(params: Mapping[str, Any], name: str) -> list[float]:
    values = params.get(name)
    if not isinstance(values, list):
        raise CalibratorError(f"parameter {name!r} must be a list of numbers")
    return [_finite({name: v}, name) for v in values]


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _clip_prob(p: float) -> float:
    return min(max(p, PROB_CLIP), 1.0 - PROB_CLIP)


def apply(calibrator: Calibrator, score: float) -> float:
    """The calibrated probability of one raw score (plain float arithmetic, ~1 us)."""
    s = min(max(score, SCORE_CLIP), 1.0 - SCORE_CLIP)
    p = calibrator.params
    if calibrator.kind == "platt":
        return _clip_prob(_sigmoid(p["a"] * math.log(s / (1.0 - s)) + p["b"]))
    if calibrator.kind == "beta":
        return _clip_prob(_sigmoid(p["a"] * math.log(s) - p["b"] * math.log(1.0 - s) + p["c"]))
    xs, ys = calibrator._knots
    i = bisect.bisect_right(xs, score)
    if i == 0:
        return _clip_prob(ys[0])
    if i == len(xs):
        return _clip_prob(ys[-1])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return _clip_prob(y0 + (y1 - y0) * (score - x0) / (x1 - x0))


def apply_many(calibrator: Calibrator, scores: Sequence[float] | FloatArray) -> FloatArray:
    """:func:`apply` over an array (vectorised; same numbers)."""
    raw = np.asarray(scores, dtype=np.float64)
    s = np.clip(raw, SCORE_CLIP, 1.0 - SCORE_CLIP)
    p = calibrator.params
    if calibrator.kind == "platt":
        z = p["a"] * np.log(s / (1.0 - s)) + p["b"]
    elif calibrator.kind == "beta":
        z = p["a"] * np.log(s) - p["b"] * np.log1p(-s) + p["c"]
    else:
        xs, ys = calibrator._knots
        out = np.interp(raw, xs, ys) if len(xs) > 1 else np.full_like(raw, ys[0])
        return np.clip(out, PROB_CLIP, 1.0 - PROB_CLIP)
    result: FloatArray = np.clip(1.0 / (1.0 + np.exp(-z)), PROB_CLIP, 1.0 - PROB_CLIP)
    return result


# -- fitting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitPolicy:
    """When a calibrator may be fitted, and which kinds are tried."""

    min_labels: int = 100
    min_class: int = 20
    isotonic_min: int = 1000
    isotonic_min_class: int = 100
    folds: int = 5
    seed: int = 0

    def enough(self, n: int, positives: int) -> bool:
        """Enough labels of each class to fit anything."""
        negatives = n - positives
        return (
            n >= self.min_labels
            and min(positives, negatives) >= max(self.min_class, 1)
            and min(positives, negatives) >= self.folds
        )

    def kinds(self, n: int, positives: int) -> list[Kind]:
        """The candidate kinds for this many labels (isotonic only with plenty)."""
        kinds: list[Kind] = ["platt", "beta"]
        if n >= self.isotonic_min and min(positives, n - positives) >= self.isotonic_min_class:
            kinds.append("isotonic")
        return kinds


def _arrays(
    scores: Sequence[float] | FloatArray, correct: Labels
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct).astype(np.int64)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError("scores and correct must be 1-D and of equal length")
    if s.size and (not np.isfinite(s).all() or s.min() < 0.0 or s.max() > 1.0):
        raise ValueError("scores must be finite and in [0, 1]")
    return s, y


_IMPORT_LOCK = threading.Lock()


def _sklearn() -> Any:
    """scikit-learn's modules, imported on first use (a second or more: not at start-up of
    every command) under a lock: two threads importing it at once (a warm-up and a refit)
    fail with a circular import."""
    with _IMPORT_LOCK:
        import sklearn.isotonic
        import sklearn.linear_model
        import sklearn.model_selection

        return sklearn


def _logistic(features: FloatArray, y: npt.NDArray[np.int64]) -> tuple[FloatArray, float]:
    model = _sklearn().linear_model.LogisticRegression(
        C=_LOGISTIC_C, solver="newton-cholesky", max_iter=100
    )
    model.fit(features, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def fit_kind(
    kind: Kind,
    scores: Sequence[float] | FloatArray,
    correct: Labels,
) -> Calibrator:
    """Fit one kind of calibrator on all the given labels (both classes must be present)."""
    s, y = _arrays(scores, correct)
    c = np.clip(s, SCORE_CLIP, 1.0 - SCORE_CLIP)
    if kind == "platt":
        (a,), b = _logistic(np.log(c / (1.0 - c))[:, None], y)
        if a < 0:  # the score ranks backwards here: a constant, never a reversed ranking
            a, b = 0.0, _base_logit(y)
        return Calibrator("platt", {"a": float(a), "b": b})
    if kind == "beta":
        features = np.column_stack([np.log(c), -np.log1p(-c)])
        (a, b), intercept = _logistic(features, y)
        if a < 0 or b < 0:
            keep = 1 if a < 0 else 0  # refit on the feature whose slope was not negative
            (w,), intercept = _logistic(features[:, [keep]], y)
            a, b = (0.0, float(w)) if keep == 1 else (float(w), 0.0)
            if w < 0:
                a, b, intercept = 0.0, 0.0, _base_logit(y)
        return Calibrator("beta", {"a": float(a), "b": float(b), "c": float(intercept)})
    if kind == "isotonic":
        iso = _sklearn().isotonic.IsotonicRegression(
            y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip"
        )
        iso.fit(s, y.astype(np.float64))
        xs = [float(v) for v in iso.X_thresholds_]
        ys = [float(v) for v in iso.y_thresholds_]
        return Calibrator("isotonic", {"x": xs, "y": ys})
    raise CalibratorError(f"unknown calibrator kind {kind!r}")


def _base_logit(y: npt.NDArray[np.int64]) -> float:
    rate = min(max(float(y.mean()), PROB_CLIP), 1.0 - PROB_CLIP)
    return math.log(rate / (1.0 - rate))


def log_loss(probabilities: Sequence[float] | FloatArray, correct: Labels) -> float:
    """Mean negative log-likelihood, probabilities clipped to [PROB_CLIP, 1 - PROB_CLIP] (so
    a raw score of exactly 0 or 1 is comparable with a calibrated one)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), PROB_CLIP, 1.0 - PROB_CLIP)
    y = np.asarray(correct).astype(bool)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def score_metrics(
    probabilities: Sequence[float] | FloatArray, correct: Labels, n_bins: int = 10
) -> dict[str, float | None]:
    """ECE, Brier, log-loss and AUROC of probabilities against labels."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct).astype(bool)
    return {
        "ece": expected_calibration_error(p, y, n_bins),
        "brier": brier_score(p, y),
        "log_loss": log_loss(p, y),
        "auroc": auroc(p, y),
    }


def _folds(
    y: npt.NDArray[np.int64], folds: int, seed: int
) -> list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    splitter = _sklearn().model_selection.StratifiedKFold(
        n_splits=folds, shuffle=True, random_state=seed
    )
    return list(splitter.split(np.zeros(y.size), y))


def _oof(
    kind: Kind,
    s: FloatArray,
    y: npt.NDArray[np.int64],
    splits: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]],
) -> FloatArray:
    """Out-of-fold predictions of one kind."""
    out = np.empty(s.size, dtype=np.float64)
    for train, test in splits:
        out[test] = apply_many(fit_kind(kind, s[train], y[train]), s[test])
    return out


@dataclass(frozen=True)
class FitResult:
    """A chosen calibrator, what it was fitted on, and its cross-validated metrics (raw
    score "before", out-of-fold calibrated "after", per kind the CV log-loss)."""

    calibrator: Calibrator
    labels: int
    positives: int
    negatives: int
    before: dict[str, float | None]
    after: dict[str, float | None]
    cv_log_loss: dict[Kind, float]


def fit(
    scores: Sequence[float] | FloatArray,
    correct: Labels,
    policy: FitPolicy | None = None,
) -> FitResult | None:
    """Choose and fit a calibrator by cross-validated log-loss; ``None`` below the policy's
    minimum (too few labels, or too few of either class): the raw score stands."""
    policy = policy or FitPolicy()
    s, y = _arrays(scores, correct)
    positives = int(y.sum())
    if not policy.enough(int(s.size), positives):
        return None
    splits = _folds(y, policy.folds, policy.seed)
    correct_bool = y.astype(bool)
    oof = {kind: _oof(kind, s, y, splits) for kind in policy.kinds(int(s.size), positives)}
    losses = {kind: log_loss(p, correct_bool) for kind, p in oof.items()}
    best = min(losses, key=lambda k: (losses[k], KINDS.index(k)))
    return FitResult(
        calibrator=fit_kind(best, s, y),
        labels=int(s.size),
        positives=positives,
        negatives=int(s.size) - positives,
        before=score_metrics(s, correct_bool),
        after=score_metrics(oof[best], correct_bool),
        cv_log_loss=losses,
    )


def cross_fit(
    scores: Sequence[float] | FloatArray,
    correct: Labels,
    policy: FitPolicy | None = None,
) -> FloatArray | None:
    """Recalibrated scores by K-fold cross-fitting: each row's value comes from a calibrator
    chosen and fitted (``fit``) on the other folds only, never on the row itself. ``None``
    when the data are below the policy's minimum."""
    policy = policy or FitPolicy()
    s, y = _arrays(scores, correct)
    if not policy.enough(int(s.size), int(y.sum())):
        return None
    out = np.empty(s.size, dtype=np.float64)
    inner = FitPolicy(
        min_labels=1,
        min_class=1,
        isotonic_min=policy.isotonic_min,
        isotonic_min_class=policy.isotonic_min_class,
        folds=policy.folds,
        seed=policy.seed,
    )
    for train, test in _folds(y, policy.folds, policy.seed):
        fitted = fit(s[train], y[train].astype(bool), inner)
        if fitted is None:  # a training fold too small for the inner CV: a constant
            out[test] = float(y[train].mean())
        else:
            out[test] = apply_many(fitted.calibrator, s[test])
    return out


def cap_sources(
    sources: Sequence[str | None], max_share: float
) -> tuple[npt.NDArray[np.bool_], int]:
    """Which labels a fit may use so that no single source holds more than ``max_share`` of
    the labels used: a source over its share keeps its newest labels (the input is in
    arrival order, oldest first). Labels without a source (no API keys) are not capped.
    Returns the mask of kept labels and how many were left out."""
    n = len(sources)
    keep = np.ones(n, dtype=bool)
    if n == 0 or max_share >= 1.0:
        return keep, 0
    counts: dict[str, int] = {}
    for src in sources:
        if src is not None:
            counts[src] = counts.get(src, 0) + 1
    unsourced = n - sum(counts.values())
    # The greatest fixed point of total = unsourced + sum(min(count, share * total)), reached
    # from above: lowering one source lowers the total, which lowers every cap.
    total = n
    while True:
        cap = math.floor(max_share * total + 1e-9)
        allowed = {s: min(c, cap) for s, c in counts.items()}
        new_total = unsourced + sum(allowed.values())
        if new_total == total:
            break
        total = new_total
    seen: dict[str, int] = {}
    for i in range(n - 1, -1, -1):  # newest first
        src = sources[i]
        if src is None:
            continue
        seen[src] = seen.get(src, 0) + 1
        if seen[src] > allowed[src]:
            keep[i] = False
    return keep, int(n - keep.sum())


@dataclass(frozen=True)
class RefitDecision:
    """The outcome of a refit: the calibrator fitted on the whole window (``None`` below the
    minimum), and whether it may replace the active one, judged on the newest labels."""

    result: FitResult | None
    promote: bool
    holdout: int = 0
    candidate_log_loss: float | None = None
    active_log_loss: float | None = None


def refit(
    scores: Sequence[float] | FloatArray,
    correct: Labels,
    active: Calibrator | None,
    policy: FitPolicy | None = None,
    holdout_share: float = 0.2,
) -> RefitDecision:
    """Refit on a window (oldest label first) and decide on promotion.

    The kind is chosen by cross-validated log-loss on the whole window (``fit``). The newest
    ``holdout_share`` of the window is held out: that kind, fitted on the older labels only,
    must have a log-loss on the held-out newest labels no worse than the active calibrator's
    (or the raw score's, when none is active) for the new version to be promoted. The version
    kept is the one fitted on the whole window. A candidate that loses is returned with
    ``promote=False`` (stored as rejected)."""
    policy = policy or FitPolicy()
    s, y = _arrays(scores, correct)
    full = fit(s, y.astype(bool), policy)
    if full is None:
        return RefitDecision(None, False)
    n_hold = max(1, math.ceil(holdout_share * s.size))
    train_s, train_y = s[:-n_hold], y[:-n_hold]
    hold_s, hold_y = s[-n_hold:], y[-n_hold:].astype(bool)
    if train_y.min() == train_y.max():  # the older labels alone cannot judge a candidate
        return RefitDecision(full, False, n_hold)
    early = fit_kind(full.calibrator.kind, train_s, train_y)
    candidate = log_loss(apply_many(early, hold_s), hold_y)
    current = log_loss(hold_s if active is None else apply_many(active, hold_s), hold_y)
    return RefitDecision(full, candidate <= current + 1e-12, n_hold, candidate, current)
