"""The calibrators' math (service/calibration/recalibrate.py): fitting, choosing, applying,
the minimum, monotonicity, the JSON parameters, the source cap and the promotion rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from service.calibration import recalibrate as rc
from service.calibration.metrics import auroc

GRID = np.linspace(0.05, 0.95, 19)


def squared(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [0, 1], right with probability s^2 (a known distortion)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.0, 1.0, n)
    return s, rng.uniform(0.0, 1.0, n) < s**2


def test_recovers_a_known_distortion_within_0_03() -> None:
    s, y = squared(5000)
    result = rc.fit(s, y)
    assert result is not None
    assert np.abs(rc.apply_many(result.calibrator, GRID) - GRID**2).max() < 0.03
    # the cross-validated metrics say the same: calibrated ECE small, AUROC kept
    assert result.after["ece"] is not None and result.after["ece"] < 0.03
    assert result.before["ece"] is not None and result.before["ece"] > 0.1
    assert result.after["auroc"] == pytest.approx(result.before["auroc"], abs=0.01)
    assert set(result.cv_log_loss) == {"platt", "beta", "isotonic"}  # 5000 labels: all three


@pytest.mark.parametrize("kind", rc.KINDS)
def test_every_kind_is_monotone_and_keeps_the_ranking(kind: rc.Kind) -> None:
    s, y = squared(3000, seed=2)
    calibrator = rc.fit_kind(kind, s, y)
    out = rc.apply_many(calibrator, np.sort(s))
    assert (np.diff(out) >= -1e-12).all()
    before, after = auroc(s, y), auroc(rc.apply_many(calibrator, s), y)
    assert before is not None and after is not None
    if kind == "isotonic":  # flat steps make ties, which can only cost what ties cost
        assert after >= before - 0.02
    else:
        assert after == pytest.approx(before, abs=1e-9)
    # the request path's scalar apply gives the same numbers as the vectorised one
    for x in (0.0, 1e-9, 0.123, 0.5, 0.77, 1.0):
        assert rc.apply(calibrator, x) == pytest.approx(float(rc.apply_many(calibrator, [x])[0]))


def test_a_score_that_ranks_backwards_gets_a_constant_never_a_reversal() -> None:
    s, y = squared(2000, seed=3)
    calibrator = rc.fit_kind("platt", s, ~y)  # right when the score is low
    assert calibrator.params["a"] == 0.0
    values = rc.apply_many(calibrator, GRID)
    assert np.ptp(values) == 0.0 and values[0] == pytest.approx(float(np.mean(~y)), abs=1e-6)
    beta = rc.fit_kind("beta", s, ~y)
    assert beta.params["a"] >= 0 and beta.params["b"] >= 0


def test_no_calibrator_below_the_minimum() -> None:
    s, y = squared(5000)
    assert rc.fit(s[:99], y[:99]) is None  # fewer than 100 labels
    few_right = np.concatenate([np.where(y)[0][:19], np.where(~y)[0][:500]])
    assert rc.fit(s[few_right], y[few_right]) is None  # 19 right answers
    assert rc.fit(s[:100], y[:100], rc.FitPolicy(min_class=1)) is not None
    assert rc.cross_fit(s[:50], y[:50]) is None
    # isotonic only with >= 1000 labels and >= 100 of each class
    assert set(rc.fit(s[:999], y[:999]).cv_log_loss) == {"platt", "beta"}  # type: ignore[union-attr]


def test_parameters_are_json_and_checked() -> None:
    s, y = squared(1500)
    for kind in rc.KINDS:
        calibrator = rc.fit_kind(kind, s, y)
        again = rc.Calibrator.from_json(json.loads(json.dumps(calibrator.to_json())))
        assert again == calibrator
        assert rc.apply(again, 0.4) == rc.apply(calibrator, 0.4)
    bad = [
        {"kind": "spline", "params": {}},
        {"kind": "platt", "params": {"a": float("nan"), "b": 0.0}},
        {"kind": "platt", "params": {"a": 1.0, "b": math.inf}},
        {"kind": "platt", "params": {"a": -1.0, "b": 0.0}},
        {"kind": "platt", "params": {"a": 1.0}},
        {"kind": "beta", "params": {"a": 1.0, "b": "2", "c": 0.0}},
        {"kind": "isotonic", "params": {"x": [0.5, 0.2], "y": [0.1, 0.2]}},
        {"kind": "isotonic", "params": {"x": [0.2, 0.5], "y": [0.3, 0.2]}},
        {"kind": "isotonic", "params": {"x": [], "y": []}},
        {"params": {"a": 1.0, "b": 0.0}},
    ]
    for data in bad:
        with pytest.raises(rc.CalibratorError):
            rc.Calibrator.from_json(data)


def test_cross_fit_never_uses_the_row_it_scores() -> None:
    # Labels that are pure noise: a calibrator fitted on its own rows would find structure;
    # cross-fitted values stay near the base rate and AUROC near chance.
    rng = np.random.default_rng(5)
    s = rng.uniform(0, 1, 400)
    y = rng.uniform(0, 1, 400) < 0.3
    out = rc.cross_fit(s, y)
    assert out is not None
    assert abs(float(out.mean()) - 0.3) < 0.05
    assert float(np.std(out)) < 0.08


def test_a_source_over_its_share_is_capped_newest_kept() -> None:
    sources = ["a"] * 80 + ["b"] * 10 + ["c"] * 10 + [None] * 20
    keep, left_out = rc.cap_sources(sources, 0.5)
    kept = [s for s, k in zip(sources, keep, strict=True) if k]
    assert kept.count("a") <= 0.5 * len(kept)
    assert kept.count("a") == 40 and left_out == 40  # 40 <= 0.5 * (40 + 40)
    assert keep[-21] and not keep[0]  # a's newest labels are the ones kept
    assert kept.count(None) == 20  # labels without a key are not capped
    assert rc.cap_sources(["a", "b"] * 10, 0.5)[1] == 0
    assert rc.cap_sources(["a"] * 10, 1.0)[1] == 0


def test_promotion_only_when_no_worse_on_the_newest_labels() -> None:
    s, y = squared(1000, seed=7)
    # no active calibrator: judged against the raw score, which s^2 labels make poor
    decision = rc.refit(s, y, None)
    assert decision.result is not None and decision.promote
    assert decision.holdout == 200
    assert decision.candidate_log_loss is not None and decision.active_log_loss is not None
    assert decision.candidate_log_loss < decision.active_log_loss
    # the world changed: the newest fifth is right with probability s, the older part s^2.
    # The active calibrator (identity: a = 1, b = 0) fits the newest labels better than a
    # candidate fitted on the older ones: it is kept, the candidate is rejected.
    rng = np.random.default_rng(8)
    y2 = y.copy()
    y2[800:] = rng.uniform(0, 1, 200) < s[800:]
    identity = rc.Calibrator("platt", {"a": 1.0, "b": 0.0})
    rejected = rc.refit(s, y2, identity)
    assert rejected.result is not None and not rejected.promote
    assert rejected.candidate_log_loss is not None and rejected.active_log_loss is not None
    assert rejected.candidate_log_loss > rejected.active_log_loss
    assert rc.refit(s[:50], y[:50], None).result is None  # below the minimum: nothing
