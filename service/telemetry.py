"""Prometheus metrics and the score log line of the ufcal service (the JSON log set-up is
``service.logs``; its names are re-exported here).

Every metric lives in a per-app :class:`Telemetry` (its own ``CollectorRegistry``), so tests
can build many apps in one process. All names start with ``ufcal_`` and follow Prometheus
conventions (``_total`` counters, base units such as seconds).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service.logs import JsonFormatter, ScoredAccessFilter, configure_logging, utc_iso

__all__ = [
    "CONFIDENCE_BUCKETS",
    "DURATION_BUCKETS",
    "CalibrationReport",
    "JsonFormatter",
    "ReliabilityBin",
    "ScoredAccessFilter",
    "Telemetry",
    "bin_label",
    "configure_logging",
    "score_log_fields",
]

#: Request latency buckets, 5 ms .. 60 s. Fine steps (2.5 s) below and just past the
#: default 20 s deadline (UFCAL_REQUEST_TIMEOUT_S), so a p95 between 10 s and the deadline
#: is resolved well enough for the latency alert (deploy/prometheus/alerts.yml, 15 s) to fire.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5,
    20.0, 22.5, 30.0, 60.0,
)  # fmt: skip
#: Engine round trips (batches) per scored question.
ENGINE_CALL_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
#: Prompts sent to the engine per scored question.
PROMPT_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Confidence / uncertainty buckets 0.1, 0.2, ..., 1.0.
CONFIDENCE_BUCKETS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))

_SCORE_LABELS = ("method", "mode")


class ReliabilityBin(Protocol):
    """One bin of a reliability diagram (``upper`` is the bin's upper edge)."""

    @property
    def upper(self) -> float: ...
    @property
    def count(self) -> int: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def confidence(self) -> float | None: ...


class CalibrationReport(Protocol):
    """Live calibration over the sliding window of scores that received feedback."""

    @property
    def n(self) -> int: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def ece(self) -> float | None: ...
    @property
    def ipr(self) -> float | None: ...
    @property
    def ce(self) -> float | None: ...
    @property
    def brier(self) -> float | None: ...
    @property
    def bins(self) -> Sequence[ReliabilityBin]: ...


def bin_label(upper: float) -> str:
    """Label value of a reliability bin: its upper edge, e.g. ``"0.1"``, ``"1.0"``."""
    text = f"{upper:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


_Labelled = Counter | Gauge | Histogram


class Telemetry:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, remote_engines: int = 0
    ) -> None:
        """``remote_engines``: how many vLLM servers UFCAL_ENGINE_URL lists (0 = in-process),
        exported so the alert on a missing vLLM scrape target fires only when one exists."""
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._live_bins: dict[tuple[int, str, str], set[str]] = {}
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus-client appends ``_total`` to counter names itself.
        self.requests = Counter(
            "ufcal_requests",
            "Scoring requests by method, mode and HTTP status code.",
            ("method", "mode", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "ufcal_request_duration_seconds",
            "Wall time of a scoring request in seconds.",
            _SCORE_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.engine_calls = Histogram(
            "ufcal_engine_calls",
            "Engine round trips (batches) per scored question.",
            _SCORE_LABELS,
            buckets=ENGINE_CALL_BUCKETS,
            registry=r,
        )
        self.engine_prompts = Histogram(
            "ufcal_engine_prompts",
            "Prompts sent to the engine per scored question.",
            _SCORE_LABELS,
            buckets=PROMPT_BUCKETS,
            registry=r,
        )
        self.confidence = Histogram(
            "ufcal_confidence",
            "Calibrated confidence of the returned answer.",
            _SCORE_LABELS,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.uncertainty = Histogram(
            "ufcal_uncertainty",
            "Uncertainty of the returned answer.",
            _SCORE_LABELS,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.in_flight_requests = Gauge(
            "ufcal_requests_in_flight", "Scoring requests being processed.", registry=r
        )
        self.engine_up = Gauge(
            "ufcal_engine_up", "1 if the inference engine is ready, else 0.", registry=r
        )
        self.engine_remote_servers = Gauge(
            "ufcal_engine_remote_servers",
            "Remote vLLM servers in UFCAL_ENGINE_URL (0 = in-process engine).",
            registry=r,
        )
        self.engine_remote_servers.set(remote_engines)
        self.unparsed = Counter(
            "ufcal_unparsed",
            "Model replies from which no answer option could be parsed.",
            _SCORE_LABELS,
            registry=r,
        )
        self.feedback = Counter(
            "ufcal_feedback",
            "Feedback received on scored answers, by outcome (correct|wrong).",
            ("outcome",),
            registry=r,
        )
        # The live window of each task, for the returned confidence and the methods' raw
        # scores (free-form and multiple-choice labels never share a window).
        live = ("confidence", "task")
        self.live_accuracy = Gauge(
            "ufcal_live_accuracy", "Accuracy over the live calibration window.", live, registry=r
        )
        self.live_ece = Gauge(
            "ufcal_live_ece",
            "Expected calibration error over the live window (confidence=raw|returned).",
            live,
            registry=r,
        )
        self.live_ipr = Gauge(
            "ufcal_live_ipr", "Inverse pair ratio over the live window.", live, registry=r
        )
        self.live_ce = Gauge(
            "ufcal_live_ce", "Confidence evenness over the live window.", live, registry=r
        )
        self.live_brier = Gauge(
            "ufcal_live_brier", "Brier score over the live window.", live, registry=r
        )
        self.live_window_size = Gauge(
            "ufcal_live_window_size", "Scores with feedback in the live window.", live, registry=r
        )
        self.live_bin_count = Gauge(
            "ufcal_live_bin_count",
            "Scores per reliability bin (label bin = upper edge) in the live window.",
            ("confidence", "task", "bin"),
            registry=r,
        )
        self.live_bin_accuracy = Gauge(
            "ufcal_live_bin_accuracy",
            "Accuracy per reliability bin in the live window.",
            ("confidence", "task", "bin"),
            registry=r,
        )
        self.live_bin_confidence = Gauge(
            "ufcal_live_bin_confidence",
            "Mean confidence per reliability bin in the live window.",
            ("confidence", "task", "bin"),
            registry=r,
        )
        key = ("model", "method", "mode", "task")
        self.calibrator_version = Gauge(
            "ufcal_calibrator_version",
            "Version of the active calibrator of a (model, method, mode, task).",
            key,
            registry=r,
        )
        self.calibrator_labels = Gauge(
            "ufcal_calibrator_labels",
            "Labels the active calibrator of a (model, method, mode, task) was fitted on.",
            key,
            registry=r,
        )
        self.recalibration_labels_capped = Gauge(
            "ufcal_recalibration_labels_capped",
            "Labels left out of the last refit because their API key was over "
            "UFCAL_RECALIBRATE_MAX_SOURCE_SHARE.",
            key,
            registry=r,
        )
        self.recalibrations = Counter(
            "ufcal_recalibrations",
            "Calibrator refits by outcome (promoted, rejected, too_few, busy).",
            ("outcome",),
            registry=r,
        )
        self.recalibration_duration = Histogram(
            "ufcal_recalibration_duration_seconds",
            "Wall time of one refit (off the request path).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.store_up = Gauge(
            "ufcal_store_up", "1 if the last database operation succeeded, else 0.", registry=r
        )
        self.store_score_queue = Gauge(
            "ufcal_store_score_queue", "Scores waiting to be written to the database.", registry=r
        )
        self.store_scores_dropped = Counter(
            "ufcal_store_scores_dropped",
            "Scores dropped because the database was unreachable and the queue was full.",
            registry=r,
        )
        self.chat_requests = Counter(
            "ufcal_chat_requests",
            "POST /v1/chat/completions by whether it was scored and streamed, and the HTTP "
            "status (its scoring is also counted as a scoring request).",
            ("scored", "stream", "status"),
            registry=r,
        )
        self.engine_up.set(0)

    # -- scoring ---------------------------------------------------------------------------

    def observe_score(
        self,
        method: str,
        mode: str,
        status: int | str,
        duration_s: float,
        engine_calls: int,
        prompts: int,
        confidence: float | None,
        uncertainty: float | None,
        unparsed: int | bool = 0,
    ) -> None:
        """Record one scored question (a successful or partially parsed request)."""
        child = self._child
        child(self.requests, method, mode, str(status)).inc()
        child(self.request_duration, method, mode).observe(duration_s)
        child(self.engine_calls, method, mode).observe(engine_calls)
        child(self.engine_prompts, method, mode).observe(prompts)
        if confidence is not None:
            child(self.confidence, method, mode).observe(confidence)
        if uncertainty is not None:
            child(self.uncertainty, method, mode).observe(uncertainty)
        if unparsed:
            child(self.unparsed, method, mode).inc(int(unparsed))

    def observe_chat(self, scored: bool, stream: bool, status: int) -> None:
        """Count one chat completion request (the sidecar)."""
        labels = ("true" if scored else "false", "true" if stream else "false", str(status))
        self._child(self.chat_requests, *labels).inc()

    def observe_error(self, method: str, mode: str, status: int | str, duration_s: float) -> None:
        """Record a request that failed (validation error, engine failure, ...)."""
        self._child(self.requests, method, mode, str(status)).inc()
        self._child(self.request_duration, method, mode).observe(duration_s)

    def _child(self, metric: _Labelled, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` takes a lock and builds a key
        on every call, and it was the largest metrics item of the /score profile."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_unparsed(self, method: str, mode: str, n: int = 1) -> None:
        """Count ``n`` model replies that could not be parsed."""
        if n > 0:
            self.unparsed.labels(method, mode).inc(n)

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Context manager counting a request in ``ufcal_requests_in_flight``."""
        self.in_flight_requests.inc()
        try:
            yield
        finally:
            self.in_flight_requests.dec()

    def inc_in_flight(self) -> None:
        """A request started."""
        self.in_flight_requests.inc()

    def dec_in_flight(self) -> None:
        """A request finished."""
        self.in_flight_requests.dec()

    def set_engine_up(self, up: bool) -> None:
        """Set ``ufcal_engine_up`` to 1 or 0."""
        self.engine_up.set(1 if up else 0)

    # -- feedback and live calibration -----------------------------------------------------

    def observe_feedback(self, correct: bool) -> None:
        """Count one feedback, outcome ``correct`` or ``wrong``."""
        self.feedback.labels("correct" if correct else "wrong").inc()

    def set_live_calibration(
        self,
        report: CalibrationReport,
        confidence: str = "returned",
        task: str = "multiple_choice",
    ) -> None:
        """Publish the live calibration report of one task's window, of the ``returned``
        confidence or of the ``raw`` scores; empty bins export only their count (0)."""
        self.live_window_size.labels(confidence, task).set(report.n)
        self.live_accuracy.labels(confidence, task).set(_value(report.accuracy))
        self.live_ece.labels(confidence, task).set(_value(report.ece))
        self.live_ipr.labels(confidence, task).set(_value(report.ipr))
        self.live_ce.labels(confidence, task).set(_value(report.ce))
        self.live_brier.labels(confidence, task).set(_value(report.brier))
        # A new report replaces this confidence's bins: no stale labels; an empty bin
        # exports its count only.
        for gauge in (self.live_bin_count, self.live_bin_accuracy, self.live_bin_confidence):
            for label in self._live_bins.get((id(gauge), confidence, task), set()):
                with contextlib.suppress(KeyError):
                    gauge.remove(confidence, task, label)
            self._live_bins[(id(gauge), confidence, task)] = set()
        for b in report.bins:
            label = bin_label(b.upper)
            for gauge, value in (
                (self.live_bin_count, b.count),
                (self.live_bin_accuracy, b.accuracy),
                (self.live_bin_confidence, b.confidence),
            ):
                if value is not None:
                    gauge.labels(confidence, task, label).set(value)
                    self._live_bins[(id(gauge), confidence, task)].add(label)

    # -- calibrators -----------------------------------------------------------------------

    def set_calibrator(self, key: tuple[str, str, str, str], version: int, labels: int) -> None:
        """Publish the active calibrator of a key."""
        self.calibrator_version.labels(*key).set(version)
        self.calibrator_labels.labels(*key).set(labels)

    def set_labels_capped(self, key: tuple[str, str, str, str], capped: int) -> None:
        """Labels the last refit of a key left out (source over its share)."""
        self.recalibration_labels_capped.labels(*key).set(capped)

    def observe_refit(self, outcome: str, duration_s: float) -> None:
        """Count one refit and its wall time."""
        self.recalibrations.labels(outcome).inc()
        self.recalibration_duration.observe(duration_s)

    # -- the store -------------------------------------------------------------------------

    def set_store_up(self, up: bool) -> None:
        """Set ``ufcal_store_up`` to 1 or 0."""
        self.store_up.set(1 if up else 0)

    def set_score_queue(self, n: int) -> None:
        """Scores waiting for the database."""
        self.store_score_queue.set(n)

    def observe_scores_dropped(self, n: int) -> None:
        """Count scores dropped while the database was unreachable."""
        self.store_scores_dropped.inc(n)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def metric_names(self) -> set[str]:
        """Every sample name this registry exports (e.g. ``ufcal_requests_total``)."""
        return {s.name for m in self.registry.collect() for s in m.samples}


# -- the score log line ----------------------------------------------------------------


def score_log_fields(
    *,
    request_id: str,
    model: str,
    method: str,
    mode: str,
    answer: str | None,
    confidence: float | None,
    uncertainty: float | None,
    engine_calls: int,
    latency_ms: float,
    status: int | str,
    log_text: bool = False,
    question: str | None = None,
    options: Sequence[str] | Mapping[str, str] | None = None,
    error: str | None = None,
    timestamp: datetime | None = None,
    task: str = "multiple_choice",
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields of the one log line per scored question (pass as ``extra={"fields": ...}``).

    ``task`` is ``multiple_choice`` or ``free_form``; ``given`` (index, match, confidence
    of a given answer) is included when there is one. The question and option texts
    (a free-form question's: the groups UF ran over) only when ``log_text`` is true.
    """
    ts = timestamp if timestamp is not None else datetime.now(timezone.utc)
    fields: dict[str, Any] = {
        "timestamp": utc_iso(ts.timestamp()),
        "id": request_id,
        "model": model,
        "method": method,
        "mode": mode,
        "task": task,
        "answer": answer,
        "confidence": confidence,
        "uncertainty": uncertainty,
        "engine_calls": engine_calls,
        "latency_ms": round(latency_ms, 3),
        "status": int(status),
    }
    if given is not None:
        fields["given"] = dict(given)
    if error is not None:
        fields["error"] = error
    if log_text:
        fields["question"] = question
        if isinstance(options, Mapping):
            fields["options"] = dict(options)
        elif options is not None:
            fields["options"] = list(options)
        else:
            fields["options"] = None
    return fields
