"""Tests for service.calibration.metrics and service.evaluation.metrics_file."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration.metrics import (
    CalibrationReport,
    ReliabilityBin,
    accuracy,
    auroc,
    bin_index,
    brier_score,
    calibration_report,
    confidence_evenness,
    expected_calibration_error,
    inverse_pair_ratio,
    reliability_bins,
)
from service.evaluation.metrics_file import load_scored_jsonl, metrics_command

SUMMARY_KEYS = {"n", "accuracy", "ece", "ipr", "ce", "brier", "auroc"}


# ------------------------------------------------------------------ reference implementations


def _ref_bin(c: float, m: int) -> int:
    """Bin i holds (i/m, (i+1)/m]; 0 goes to bin 0. Direct scan, no arithmetic tricks."""
    for i in range(m):
        lo, hi = i / m, (i + 1) / m
        if lo < c <= hi or (i == 0 and c == 0.0):
            return i
    raise AssertionError(f"{c} in no bin")


def _ref_groups(conf: list[float], corr: list[bool], m: int) -> list[list[tuple[float, bool]]]:
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(m)]
    for c, y in zip(conf, corr, strict=True):
        groups[_ref_bin(c, m)].append((c, y))
    return groups


def _ref_ece(conf: list[float], corr: list[bool], m: int) -> float:
    n = len(conf)
    total = 0.0
    for group in _ref_groups(conf, corr, m):
        if not group:
            continue
        acc = sum(1 for _, y in group if y) / len(group)
        mean_conf = sum(c for c, _ in group) / len(group)
        total += len(group) / n * abs(acc - mean_conf)
    return total


def _ref_ipr(conf: list[float], corr: list[bool], m: int) -> float:
    accs = [sum(1 for _, y in g if y) / len(g) for g in _ref_groups(conf, corr, m) if g]
    k = len(accs)
    if k < 2:
        return 0.0
    inverse = sum(1 for i, j in itertools.combinations(range(k), 2) if accs[i] > accs[j])
    return inverse / math.comb(k, 2)


def _ref_ce(conf: list[float], m: int) -> float:
    if m == 1:
        return 0.0
    n = len(conf)
    h = 0.0
    for g in _ref_groups(conf, [False] * n, m):
        if g:
            p = len(g) / n
            h -= p * math.log(p)
    return h / math.log(m)


def _ref_auroc(conf: list[float], corr: list[bool]) -> float | None:
    pos = [c for c, y in zip(conf, corr, strict=True) if y]
    neg = [c for c, y in zip(conf, corr, strict=True) if not y]
    if not pos or not neg:
        return None
    score = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return score / (len(pos) * len(neg))


# Confidences k/1000: never within float noise of a bin edge unless exactly on it, so the
# naive reference and the implementation must agree bin for bin.
grid_conf = st.integers(0, 1000).map(lambda k: k / 1000)
scored = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(grid_conf, min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


# ------------------------------------------------------------------------------ binning


@pytest.mark.parametrize("k", range(1, 11))
def test_decimal_bin_edges_are_right_closed(k: int) -> None:
    edge = float(f"{k / 10:.1f}")  # 0.1, 0.2, ..., 1.0 as written
    assert bin_index([edge], 10).tolist() == [k - 1]
    if k < 10:
        assert bin_index([edge + 1e-6], 10).tolist() == [k]
    assert bin_index([edge - 1e-6], 10).tolist() == [k - 1]


def test_float_noise_at_edges() -> None:
    # Computed values miss the edge by an ulp: naive ceil(c*M)-1 would put them one bin up.
    assert 0.1 * 3 * 10 > 3 and (0.1 + 0.2) * 10 > 3 and 0.1 * 7 * 10 > 7
    assert bin_index([0.3, 0.1 * 3, 0.1 + 0.2, 0.7, 0.1 * 7], 10).tolist() == [2, 2, 2, 6, 6]
    # Even decimal literals do for some M: 0.28 * 25 and 0.07 * 100 are just above 7.
    assert 0.28 * 25 > 7 and 0.07 * 100 > 7
    assert bin_index([0.28], 25).tolist() == [6]
    assert bin_index([0.07], 100).tolist() == [6]
    assert bin_index([1 / 3, 2 / 3, 1.0], 3).tolist() == [0, 1, 2]
    assert bin_index([0.25, 0.5, 0.75], 4).tolist() == [0, 1, 2]


def test_zero_and_one_fall_in_first_and_last_bin() -> None:
    assert bin_index([0.0, 1.0], 10).tolist() == [0, 9]
    assert bin_index([0.0, 1.0], 1).tolist() == [0, 0]
    assert bin_index([0.0, 1.0], 7).tolist() == [0, 6]


def test_bin_index_empty_and_bad_input() -> None:
    assert bin_index([], 10).tolist() == []
    with pytest.raises(ValueError, match="n_bins"):
        bin_index([0.5], 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bin_index([1.5], 10)
    with pytest.raises(ValueError, match="NaN"):
        bin_index([float("nan")], 10)


@given(st.lists(grid_conf, min_size=1, max_size=50), st.integers(1, 25))
def test_bin_index_matches_direct_scan(conf: list[float], m: int) -> None:
    assert bin_index(conf, m).tolist() == [_ref_bin(c, m) for c in conf]


def test_reliability_bins_shape_and_empty_bins() -> None:
    bins = reliability_bins([0.0, 0.05, 0.55, 1.0], [True, False, True, True], n_bins=10)
    assert len(bins) == 10
    assert all(isinstance(b, ReliabilityBin) for b in bins)
    assert [b.lower for b in bins] == pytest.approx([i / 10 for i in range(10)])
    assert [b.upper for b in bins] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert [b.count for b in bins] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert bins[0].accuracy == 0.5 and bins[0].confidence == pytest.approx(0.025)
    assert bins[5].accuracy == 1.0 and bins[5].confidence == pytest.approx(0.55)
    assert bins[9].accuracy == 1.0 and bins[9].confidence == 1.0
    for i in (1, 2, 3, 4, 6, 7, 8):
        assert bins[i].accuracy is None and bins[i].confidence is None


# ------------------------------------------------------------------------------ metrics


def test_accuracy() -> None:
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([0, 1]) == 0.5  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        accuracy([])


def test_ece_by_hand() -> None:
    # bin 2: acc 0.5, conf 0.25 -> 2/4 * 0.25; bin 9: acc 1, conf 0.95 -> 2/4 * 0.05
    ece = expected_calibration_error([0.25, 0.25, 0.95, 0.95], [True, False, True, True])
    assert ece == pytest.approx(0.15)
    # Perfectly calibrated within each bin.
    assert expected_calibration_error([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    # Always 100% sure and always wrong.
    assert expected_calibration_error([1.0] * 3, [False] * 3) == pytest.approx(1.0)


def test_ece_against_loop_seeded() -> None:
    rng = np.random.default_rng(20240917)
    for trial in range(50):
        n = int(rng.integers(1, 400))
        m = int(rng.integers(1, 21))
        conf = rng.random(n)
        if trial % 2:  # coarse values: many ties and exact bin edges
            conf = np.round(conf, 1)
        corr = rng.random(n) < conf
        expected = _ref_ece(conf.tolist(), corr.tolist(), m)
        assert expected_calibration_error(conf, corr, m) == pytest.approx(expected, abs=1e-12)


@given(scored, st.integers(1, 20))
def test_binned_metrics_match_reference(data: tuple[list[float], list[bool]], m: int) -> None:
    conf, corr = data
    assert expected_calibration_error(conf, corr, m) == pytest.approx(
        _ref_ece(conf, corr, m), abs=1e-12
    )
    assert inverse_pair_ratio(conf, corr, m) == pytest.approx(_ref_ipr(conf, corr, m))
    assert confidence_evenness(conf, m) == pytest.approx(_ref_ce(conf, m), abs=1e-12)


def test_ipr_hand_built() -> None:
    # Non-empty bins in confidence order: 1 (acc 1), 3 (acc 1/2), 5 (acc 0), 8 (acc 1).
    # Inverse pairs: (1,3), (1,5), (3,5); ties (1,8) and rises (3,8), (5,8) don't count.
    conf = [0.15, 0.35, 0.35, 0.55, 0.55, 0.85]
    corr = [True, True, False, False, False, True]
    assert inverse_pair_ratio(conf, corr) == pytest.approx(3 / 6)


def test_ipr_monotone_and_reversed() -> None:
    conf = [0.05, 0.15, 0.15, 0.25, 0.25, 0.25]
    assert inverse_pair_ratio(conf, [False, True, False, True, True, True]) == 0.0
    assert inverse_pair_ratio(conf, [True, True, False, False, False, False]) == 1.0


def test_ipr_fewer_than_two_nonempty_bins() -> None:
    assert inverse_pair_ratio([0.42], [True]) == 0.0
    assert inverse_pair_ratio([0.41, 0.45, 0.5], [True, False, False]) == 0.0
    assert inverse_pair_ratio([0.1, 0.9], [True, False], n_bins=1) == 0.0


def test_constant_confidence_has_zero_ce_and_ipr() -> None:
    conf = [0.7] * 20
    corr = [i % 3 == 0 for i in range(20)]
    report = calibration_report(conf, corr)
    assert report.ce == 0.0
    assert report.ipr == 0.0
    assert sum(b.count for b in report.bins) == 20
    assert report.bins[6].count == 20


def test_ce_even_spread_is_one() -> None:
    conf = [(i + 0.5) / 10 for i in range(10)] * 3
    assert confidence_evenness(conf) == pytest.approx(1.0)
    # Exactly on the upper edges works too: 0.1, ..., 1.0 cover all ten bins once.
    assert confidence_evenness([k / 10 for k in range(1, 11)]) == pytest.approx(1.0)


def test_ce_two_bins_and_single_bin_setting() -> None:
    assert confidence_evenness([0.05, 0.95]) == pytest.approx(math.log(2) / math.log(10))
    assert confidence_evenness([0.05, 0.95], n_bins=2) == pytest.approx(1.0)
    assert confidence_evenness([0.05, 0.95], n_bins=1) == 0.0


def test_brier_by_hand() -> None:
    # (0.9-1)^2 + (0.2-0)^2 + (0.6-0)^2 = 0.01 + 0.04 + 0.36
    assert brier_score([0.9, 0.2, 0.6], [True, False, False]) == pytest.approx(0.41 / 3)
    assert brier_score([1.0, 0.0], [True, False]) == 0.0
    assert brier_score([0.0, 1.0], [True, False]) == 1.0


def test_auroc_by_hand() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5] * 4, [True, False, True, False]) == 0.5
    # pos {0.8, 0.5}, neg {0.5, 0.2}: 0.8 beats both, 0.5 ties 0.5 and beats 0.2 -> 3.5/4
    assert auroc([0.8, 0.5, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.875)


def test_auroc_undefined_when_one_class() -> None:
    assert auroc([0.1, 0.9], [True, True]) is None
    assert auroc([0.1, 0.9], [False, False]) is None
    assert calibration_report([0.3], [True]).auroc is None


def test_auroc_against_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for trial in range(60):
        n = int(rng.integers(2, 500))
        conf = rng.random(n)
        if trial % 3 == 0:
            conf = np.round(conf, 1)  # heavy ties
        corr = rng.random(n) < (0.3 + 0.4 * conf)
        if corr.all() or not corr.any():
            corr[0] = not corr[0]
        expected = float(sklearn_metrics.roc_auc_score(corr, conf))
        assert auroc(conf, corr) == pytest.approx(expected, abs=1e-12)


@given(scored)
def test_auroc_matches_pairwise_count(data: tuple[list[float], list[bool]]) -> None:
    conf, corr = data
    expected = _ref_auroc(conf, corr)
    got = auroc(conf, corr)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)
        assert auroc([1.0 - c for c in conf], corr) == pytest.approx(1.0 - expected, abs=1e-12)


@settings(max_examples=200)
@given(scored, st.integers(1, 30))
def test_report_invariants(data: tuple[list[float], list[bool]], m: int) -> None:
    conf, corr = data
    report = calibration_report(conf, corr, n_bins=m)
    assert report.n == len(conf)
    assert len(report.bins) == m
    assert sum(b.count for b in report.bins) == len(conf)
    for value in (report.accuracy, report.ece, report.ipr, report.ce, report.brier):
        assert 0.0 <= value <= 1.0
    assert report.auroc is None or 0.0 <= report.auroc <= 1.0
    assert report.accuracy == pytest.approx(sum(corr) / len(corr))
    assert report.brier == pytest.approx(brier_score(conf, corr))


# ------------------------------------------------------------------------------- report


def test_report_summary_is_plain_json() -> None:
    report = calibration_report([0.9, 0.8, 0.3, 0.6], [True, True, False, False])
    assert isinstance(report, CalibrationReport)
    summary = report.summary()
    assert set(summary) == SUMMARY_KEYS
    assert type(summary["n"]) is int
    for key in SUMMARY_KEYS - {"n"}:
        assert type(summary[key]) is float
    assert json.loads(json.dumps(summary)) == summary
    assert summary["auroc"] == 1.0
    with pytest.raises(AttributeError):
        report.ece = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("conf", "corr", "n_bins", "match"),
    [
        ([], [], 10, "at least one"),
        ([0.5, 0.6], [True], 10, "length"),
        ([0.5, 1.5], [True, False], 10, r"\[0, 1\]"),
        ([-0.1], [True], 10, r"\[0, 1\]"),
        ([float("nan")], [True], 10, "NaN"),
        ([float("inf")], [True], 10, r"\[0, 1\]"),
        (["high"], [True], 10, "numbers"),
        ([0.5], [2], 10, "boolean"),
        ([0.5], [True], 0, "n_bins"),
        ([0.5], [True], -3, "n_bins"),
        ([0.5], [True], 2.5, "n_bins"),
    ],
)
def test_bad_input_raises(
    conf: list[object], corr: list[object], n_bins: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        calibration_report(conf, corr, n_bins=n_bins)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- metrics_file


def _write(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_metrics_command_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        [
            '{"id": "q1", "confidence": 0.25, "correct": true}',
            "",
            '{"id": "q2", "confidence": 0.25, "correct": false}',
            "   ",
            '{"confidence": 0.95, "correct": true, "answer": "B"}',
            '{"confidence": 0.95, "correct": true}',
        ],
    )
    assert load_scored_jsonl(path) == ([0.25, 0.25, 0.95, 0.95], [True, False, True, True])
    assert metrics_command(path, 10) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == SUMMARY_KEYS
    assert result["n"] == 4
    assert result["accuracy"] == 0.75
    assert result["ece"] == pytest.approx(0.15)
    assert result["auroc"] == pytest.approx(expected := _ref_auroc(*load_scored_jsonl(path)))
    assert expected is not None


def test_metrics_command_bins_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        ['{"confidence": 0.05, "correct": true}', '{"confidence": 0.95, "correct": false}'],
    )
    assert metrics_command(path, 2) == 0
    assert json.loads(capsys.readouterr().out)["ce"] == pytest.approx(1.0)
    assert metrics_command(path, 0) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "n_bins" in captured.err


def test_metrics_command_null_auroc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path, ['{"confidence": 1, "correct": true}', '{"confidence": 0, "correct": true}']
    )
    assert metrics_command(path, 10) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["auroc"] is None
    assert result["n"] == 2


GOOD = '{"confidence": 0.5, "correct": true}'


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"correct": true}', '"confidence"'),
        ('{"confidence": 0.5}', '"correct"'),
        ('{"confidence": 1.5, "correct": true}', '"confidence" must be a number in [0, 1]'),
        ('{"confidence": -0.2, "correct": true}', '"confidence" must be a number in [0, 1]'),
        ('{"confidence": "0.5", "correct": true}', '"confidence" must be a number in [0, 1]'),
        ('{"confidence": true, "correct": true}', '"confidence" must be a number in [0, 1]'),
        ('{"confidence": NaN, "correct": true}', '"confidence" must be a number in [0, 1]'),
        ('{"confidence": 0.5, "correct": "yes"}', '"correct" must be true or false'),
        ('{"confidence": 0.5, "correct": 1}', '"correct" must be true or false'),
        ("[0.5, true]", "JSON object"),
    ],
)
def test_metrics_command_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, fragment: str
) -> None:
    # Blank line 2 still counts: the bad record is on line 4.
    path = _write(tmp_path, [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(ValueError, match="line 4") as info:
        load_scored_jsonl(path)
    assert fragment in str(info.value)
    assert metrics_command(path, 10) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "line 4" in captured.err
    assert fragment in captured.err


def test_metrics_command_empty_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, ["", "  "])
    assert metrics_command(path, 10) == 2
    assert "no scored answers" in capsys.readouterr().err
    assert metrics_command(str(tmp_path / "nope.jsonl"), 10) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "nope.jsonl" in captured.err
