"""Unit tests of service.telemetry: Prometheus metrics and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry import (
    CONFIDENCE_BUCKETS,
    JsonFormatter,
    ScoredAccessFilter,
    Telemetry,
    bin_label,
    configure_logging,
    score_log_fields,
)


@dataclass(frozen=True)
class Bin:
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True)
class Report:
    n: int
    accuracy: float | None
    ece: float | None
    ipr: float | None
    ce: float | None
    brier: float | None
    bins: list[Bin] = field(default_factory=list)


def samples(t: Telemetry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the exposition text back: (sample name, labels) -> value."""
    body, _ = t.render()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_render_content_type_and_prefix() -> None:
    t = Telemetry()
    body, ctype = t.render()
    assert ctype.startswith("text/plain")
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
    assert names, "no metric families rendered"
    assert all(n.startswith("ufcal_") for n in names)
    # engine starts down until the app says otherwise
    assert samples(t)[("ufcal_engine_up", lbl())] == 0.0


def test_apps_can_be_created_repeatedly() -> None:
    a, b = Telemetry(), Telemetry()
    a.observe_error("uf", "local", 500, 0.01)
    assert ("ufcal_requests_total", lbl(method="uf", mode="local", status="500")) in samples(a)
    assert ("ufcal_requests_total", lbl(method="uf", mode="local", status="500")) not in samples(b)


def test_observe_score_metrics_and_labels() -> None:
    t = Telemetry()
    t.observe_score(
        method="uf",
        mode="remote",
        status=200,
        duration_s=0.42,
        engine_calls=3,
        prompts=12,
        confidence=0.83,
        uncertainty=0.17,
        unparsed=2,
    )
    s = samples(t)
    ml = {"method": "uf", "mode": "remote"}
    assert s[("ufcal_requests_total", lbl(**ml, status="200"))] == 1.0
    assert s[("ufcal_request_duration_seconds_count", lbl(**ml))] == 1.0
    assert s[("ufcal_request_duration_seconds_sum", lbl(**ml))] == pytest.approx(0.42)
    assert s[("ufcal_request_duration_seconds_bucket", lbl(**ml, le="0.5"))] == 1.0
    assert s[("ufcal_request_duration_seconds_bucket", lbl(**ml, le="0.25"))] == 0.0
    assert s[("ufcal_request_duration_seconds_bucket", lbl(**ml, le="0.005"))] == 0.0
    assert s[("ufcal_request_duration_seconds_bucket", lbl(**ml, le="60.0"))] == 1.0
    assert s[("ufcal_engine_calls_sum", lbl(**ml))] == 3.0
    assert s[("ufcal_engine_prompts_sum", lbl(**ml))] == 12.0
    assert s[("ufcal_confidence_sum", lbl(**ml))] == pytest.approx(0.83)
    assert s[("ufcal_confidence_bucket", lbl(**ml, le="0.9"))] == 1.0
    assert s[("ufcal_confidence_bucket", lbl(**ml, le="0.8"))] == 0.0
    assert s[("ufcal_uncertainty_bucket", lbl(**ml, le="0.2"))] == 1.0
    assert s[("ufcal_unparsed_total", lbl(**ml))] == 2.0


def test_confidence_buckets_are_tenths() -> None:
    assert CONFIDENCE_BUCKETS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    t = Telemetry()
    t.observe_score("uf", "local", 200, 0.1, 1, 1, 0.5, 0.5)
    les = {dict(k[1])["le"] for k in samples(t) if k[0] == "ufcal_confidence_bucket"}
    assert les == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0", "+Inf"}


def test_score_without_confidence_and_parsed() -> None:
    t = Telemetry()
    t.observe_score("verbal", "local", "200", 0.05, 1, 1, None, None, unparsed=False)
    s = samples(t)
    assert s[("ufcal_requests_total", lbl(method="verbal", mode="local", status="200"))] == 1.0
    assert ("ufcal_confidence_count", lbl(method="verbal", mode="local")) not in s
    assert ("ufcal_unparsed_total", lbl(method="verbal", mode="local")) not in s


def test_observe_error_status_labels() -> None:
    t = Telemetry()
    t.observe_error("uf", "local", 422, 0.002)
    t.observe_error("uf", "local", "502", 1.5)
    t.observe_error("uf", "local", 502, 2.0)
    s = samples(t)
    assert s[("ufcal_requests_total", lbl(method="uf", mode="local", status="422"))] == 1.0
    assert s[("ufcal_requests_total", lbl(method="uf", mode="local", status="502"))] == 2.0
    assert s[("ufcal_request_duration_seconds_count", lbl(method="uf", mode="local"))] == 3.0


def test_in_flight_and_engine_up() -> None:
    t = Telemetry()
    with t.in_flight():
        assert samples(t)[("ufcal_requests_in_flight", lbl())] == 1.0
        t.inc_in_flight()
        assert samples(t)[("ufcal_requests_in_flight", lbl())] == 2.0
        t.dec_in_flight()
    assert samples(t)[("ufcal_requests_in_flight", lbl())] == 0.0
    with pytest.raises(RuntimeError), t.in_flight():
        raise RuntimeError("boom")
    assert samples(t)[("ufcal_requests_in_flight", lbl())] == 0.0
    t.set_engine_up(True)
    assert samples(t)[("ufcal_engine_up", lbl())] == 1.0
    t.set_engine_up(False)
    assert samples(t)[("ufcal_engine_up", lbl())] == 0.0


def test_feedback_outcomes() -> None:
    t = Telemetry()
    t.observe_feedback(True)
    t.observe_feedback(True)
    t.observe_feedback(False)
    s = samples(t)
    assert s[("ufcal_feedback_total", lbl(outcome="correct"))] == 2.0
    assert s[("ufcal_feedback_total", lbl(outcome="wrong"))] == 1.0


def test_bin_label() -> None:
    assert bin_label(0.1) == "0.1"
    assert bin_label(0.30000000000000004) == "0.3"
    assert bin_label(1.0) == "1.0"
    assert bin_label(0.05) == "0.05"


def test_set_live_calibration() -> None:
    t = Telemetry()
    bins = [Bin(round(0.1 * i, 1), 0, None, None) for i in range(1, 11)]
    bins[6] = Bin(0.7, 4, 0.5, 0.65)
    bins[9] = Bin(1.0, 6, 1.0, 0.95)
    t.set_live_calibration(Report(10, 0.8, 0.12, 0.9, 0.7, 0.15, bins))
    s = samples(t)
    assert s[("ufcal_live_window_size", lbl(confidence="returned", task="multiple_choice"))] == 10.0
    assert s[
        ("ufcal_live_accuracy", lbl(confidence="returned", task="multiple_choice"))
    ] == pytest.approx(0.8)
    assert s[
        ("ufcal_live_ece", lbl(confidence="returned", task="multiple_choice"))
    ] == pytest.approx(0.12)
    assert s[
        ("ufcal_live_ipr", lbl(confidence="returned", task="multiple_choice"))
    ] == pytest.approx(0.9)
    assert s[
        ("ufcal_live_ce", lbl(confidence="returned", task="multiple_choice"))
    ] == pytest.approx(0.7)
    assert s[
        ("ufcal_live_brier", lbl(confidence="returned", task="multiple_choice"))
    ] == pytest.approx(0.15)
    assert (
        s[("ufcal_live_bin_count", lbl(confidence="returned", task="multiple_choice", bin="0.7"))]
        == 4.0
    )
    assert (
        s[("ufcal_live_bin_count", lbl(confidence="returned", task="multiple_choice", bin="0.1"))]
        == 0.0
    )
    assert s[
        ("ufcal_live_bin_accuracy", lbl(confidence="returned", task="multiple_choice", bin="0.7"))
    ] == pytest.approx(0.5)
    assert s[
        ("ufcal_live_bin_confidence", lbl(confidence="returned", task="multiple_choice", bin="1.0"))
    ] == pytest.approx(0.95)
    assert (
        "ufcal_live_bin_accuracy",
        lbl(confidence="returned", task="multiple_choice", bin="0.1"),
    ) not in s  # empty bin: count only
    counted = {dict(k[1])["bin"] for k in s if k[0] == "ufcal_live_bin_count"}
    assert len(counted) == 10

    # a later report replaces the bins (no stale labels) and None metrics become NaN
    t.set_live_calibration(Report(0, None, None, None, None, None, [Bin(0.5, 0, None, None)]))
    s = samples(t)
    assert s[("ufcal_live_window_size", lbl(confidence="returned", task="multiple_choice"))] == 0.0
    assert math.isnan(s[("ufcal_live_ece", lbl(confidence="returned", task="multiple_choice"))])
    assert {dict(k[1])["bin"] for k in s if k[0] == "ufcal_live_bin_count"} == {"0.5"}
    assert not any(k[0] == "ufcal_live_bin_accuracy" for k in s)


# -- logs ----------------------------------------------------------------------------------


def _format(record_logger: str, msg: str, **extra: object) -> dict[str, object]:
    logger = logging.getLogger(record_logger)
    record = logger.makeRecord(record_logger, logging.INFO, __file__, 1, msg, (), None, extra=extra)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_json_formatter_base_fields() -> None:
    out = _format("ufcal.test", "hello %s")
    assert out["level"] == "INFO"
    assert out["logger"] == "ufcal.test"
    assert out["message"] == "hello %s"
    ts = str(out["timestamp"])
    assert ts.endswith("Z")
    parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_json_formatter_fields_and_exception() -> None:
    out = _format("x", "scored", fields={"id": "abc", "confidence": 0.5, "when": datetime.now()})
    assert out["id"] == "abc" and out["confidence"] == 0.5
    assert isinstance(out["when"], str)  # non-JSON values are stringified, not fatal
    try:
        raise ValueError("bad")
    except ValueError:
        rec = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    out = json.loads(JsonFormatter().format(rec))
    assert "ValueError: bad" in out["exception"]


def _score_fields(**kw: object) -> dict[str, object]:
    args: dict[str, object] = {
        "request_id": "req-1",
        "model": "SmolLM2-135M-Instruct",
        "method": "uf",
        "mode": "local",
        "answer": "B",
        "confidence": 0.73,
        "uncertainty": 0.27,
        "engine_calls": 2,
        "latency_ms": 123.4567,
        "status": 200,
        "question": "What is 2+2? SECRET-QUESTION",
        "options": ["3", "4 SECRET-OPTION"],
        "timestamp": datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc),
    }
    args.update(kw)
    return score_log_fields(**args)  # type: ignore[arg-type]


def test_score_log_line_without_text() -> None:
    fields = _score_fields()
    out = _format("ufcal.score", "score", fields=fields)
    for key in (
        "timestamp",
        "id",
        "model",
        "method",
        "mode",
        "answer",
        "confidence",
        "uncertainty",
        "engine_calls",
        "latency_ms",
        "status",
    ):
        assert key in out, key
    assert out["timestamp"] == "2024-05-01T12:00:00.000Z"
    assert out["id"] == "req-1"
    assert out["answer"] == "B"
    assert out["status"] == 200
    assert out["latency_ms"] == pytest.approx(123.457)
    assert "question" not in out and "options" not in out
    assert "SECRET" not in json.dumps(out)


def test_score_log_line_with_text() -> None:
    out = _format("ufcal.score", "score", fields=_score_fields(log_text=True))
    assert out["question"] == "What is 2+2? SECRET-QUESTION"
    assert out["options"] == ["3", "4 SECRET-OPTION"]
    out = _format(
        "ufcal.score", "score", fields=_score_fields(log_text=True, options={"A": "3", "B": "4"})
    )
    assert out["options"] == {"A": "3", "B": "4"}


def test_score_log_error_field() -> None:
    out = _format(
        "ufcal.score",
        "score",
        fields=_score_fields(answer=None, confidence=None, status=502, error="engine down"),
    )
    assert out["status"] == 502 and out["error"] == "engine down"
    assert out["answer"] is None and out["confidence"] is None


def test_configure_logging_writes_json_to_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    # not in the test process: vLLM's variables would reach every server a later test starts
    monkeypatch.setattr("service.logs._point_vllm_here", lambda level, stream: None)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("debug")
        assert root.level == logging.DEBUG
        logging.getLogger("ufcal.test").info("hi", extra={"fields": {"k": 1}})
        logging.getLogger("uvicorn.access").info("GET /healthz 200")
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert lines[0]["message"] == "hi" and lines[0]["k"] == 1
        assert lines[1]["logger"] == "uvicorn.access"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        logging.captureWarnings(False)


def test_access_line_of_a_successful_score_is_dropped_the_others_kept() -> None:
    """The "scored" line covers a 200 /score; every other access line stays."""
    keep = ScoredAccessFilter()

    def access(method: str, path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", method, path, "1.1", status), None,
        )  # fmt: skip

    assert not keep.filter(access("POST", "/score", 200))
    assert keep.filter(access("POST", "/score", 422))
    assert keep.filter(access("POST", "/score/batch", 200))
    assert keep.filter(access("POST", "/feedback", 200))
    assert keep.filter(access("GET", "/metrics", 200))
