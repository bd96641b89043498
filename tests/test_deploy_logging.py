"""The log-shipping example (deploy/logging): the compose override, Loki's configuration,
Grafana Alloy's pipeline and the dashboard's Logs row.

No Debian or PyPI package ships Alloy or Loki (so neither `alloy fmt` nor `loki
-verify-config` can run here): the Alloy file is checked by structure, as the dashboard is
(balanced blocks, every component it forwards to or reads from is defined, the JSON fields it
parses are the ones ufcal writes), and docker-compose validates the merged stack."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import yaml

from service.logs import JsonFormatter
from tests.test_deploy import (  # noqa: F401
    COMPOSE,
    DASHBOARD,
    ROOT,
    _compose_secrets,
    _ok,
    _panels,
    _published,
    _run,
    compose_cmd,
)

LOGGING = ROOT / "deploy" / "logging"
OVERRIDE = LOGGING / "docker-compose.logging.yml"
ALLOY = LOGGING / "config.alloy"
LOKI = LOGGING / "loki.yaml"
LOKI_DATASOURCE = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "loki.yml"

BLOCK_RE = re.compile(r'^([a-z_][a-z0-9_.]*)\s+"([a-z0-9_]+)"\s*\{', re.MULTILINE)
REFERENCE_RE = re.compile(
    r"\b((?:discovery|loki|prometheus|local)\.[a-z_]+\.[a-z0-9_]+)\.(receiver|targets|rules)\b"
)


def _alloy_text() -> str:
    """The Alloy file without its comment lines."""
    return "\n".join(
        line for line in ALLOY.read_text().splitlines() if not line.lstrip().startswith("//")
    )


def _components(text: str) -> dict[str, str]:
    """``{"loki.process.ufcal_json": body}`` for each top-level component block."""
    out = {}
    for match in BLOCK_RE.finditer(text):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out[f"{match.group(1)}.{match.group(2)}"] = text[match.end() : i - 1]
    return out


def test_alloy_pipeline_is_complete() -> None:
    text = _alloy_text()
    assert text.count("{") == text.count("}")
    components = _components(text)
    assert {
        "discovery.docker.containers",
        "discovery.relabel.containers",
        "loki.source.docker.containers",
        "loki.process.ufcal_json",
        "loki.write.local",
    } <= set(components)
    references = REFERENCE_RE.findall(text)
    assert references
    for name, _export in references:
        assert name in components, f"{name} is used but not defined"
    # the chain: docker -> process (JSON) -> write
    source = components["loki.source.docker.containers"]
    assert "discovery.docker.containers.targets" in source
    assert "discovery.relabel.containers.rules" in source
    assert "loki.process.ufcal_json.receiver" in source
    assert "loki.write.local.receiver" in components["loki.process.ufcal_json"]
    assert '"http://loki:3100/loki/api/v1/push"' in components["loki.write.local"]


def test_alloy_parses_the_fields_ufcal_writes() -> None:
    """The JSON stage reads fields a real ufcal line has; the timestamp stage reads its
    timestamp; the labels stay few (level, process), never the message or an id."""
    process = _components(_alloy_text())["loki.process.ufcal_json"]
    expressions = re.search(r"stage\.json\s*\{\s*expressions\s*=\s*\{([^}]*)\}", process)
    assert expressions
    pairs = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', expressions.group(1)))
    record = logging.LogRecord("vllm.engine", logging.ERROR, __file__, 1, "boom", None, None)
    record.vllm_process_name = "EngineCore"
    record.fields = {"status": 502}
    line = json.loads(JsonFormatter().format(record))
    for name, field in pairs.items():
        assert (field or name) in line, f"ufcal lines have no {field or name!r}"
    timestamp = re.search(r'stage\.timestamp\s*\{\s*source\s*=\s*"(\w+)"', process)
    assert timestamp and pairs[timestamp.group(1)] == "timestamp"
    labels = re.search(r"stage\.labels\s*\{\s*values\s*=\s*\{([^}]*)\}", process)
    assert labels
    assert set(re.findall(r"(\w+)\s*=", labels.group(1))) == {"level", "process"}


def test_loki_config() -> None:
    config = yaml.safe_load(LOKI.read_text())
    assert config["auth_enabled"] is False
    assert config["server"]["http_listen_port"] == 3100
    schema = config["schema_config"]["configs"][0]
    assert schema["store"] == "tsdb" and schema["schema"] == "v13"
    assert config["limits_config"]["retention_period"]
    assert config["compactor"]["retention_enabled"] is True


def test_override_mounts_exist_and_match_the_configs() -> None:
    raw = yaml.safe_load(OVERRIDE.read_text())
    services = raw["services"]
    assert {"loki", "alloy"} <= set(services)
    mounts = [str(v) for svc in services.values() for v in svc.get("volumes", [])]
    for mount in mounts:
        if mount.startswith("./"):
            assert (ROOT / mount.split(":", 1)[0]).exists(), mount
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in services["alloy"]["volumes"]
    assert "unix:///var/run/docker.sock" in ALLOY.read_text()
    config_path = next(v.split(":")[1] for v in services["alloy"]["volumes"] if "config" in v)
    assert config_path in services["alloy"]["command"]
    datasource = yaml.safe_load(LOKI_DATASOURCE.read_text())["datasources"][0]
    assert datasource["type"] == "loki" and datasource["url"] == "http://loki:3100"


def test_compose_accepts_the_override(compose_cmd: list[str]) -> None:  # noqa: F811
    proc = _run(
        [*compose_cmd, "-f", str(COMPOSE), "-f", str(OVERRIDE), "--profile", "cpu", "config"],
        env=_compose_secrets(),
    )
    _ok(proc)
    services = yaml.safe_load(proc.stdout)["services"]
    assert {"loki", "alloy", "grafana", "prometheus", "ufcal-cpu"} <= set(services)
    # No authentication in either: local only by default, like Prometheus and Grafana.
    assert _published(services["loki"]) == [("127.0.0.1", "3100")]
    assert _published(services["alloy"]) == [("127.0.0.1", "12345")]


def _loki_panels() -> list[dict[str, Any]]:
    d = json.loads(DASHBOARD.read_text())
    return [p for p in _panels(d) if p.get("datasource", {}).get("type") == "loki"]


def test_dashboard_logs_row() -> None:
    d = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["loki"]["type"] == "datasource" and variables["loki"]["query"] == "loki"
    panels = _loki_panels()
    assert {p["type"] for p in panels} >= {"logs", "timeseries"}
    exprs = []
    for panel in panels:
        assert panel["datasource"] == {"type": "loki", "uid": "${loki}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${loki}"
            exprs.append(target["expr"])
            # a stream selector on a label Alloy sets, then a pipeline
            assert re.match(r'^(sum by \(\w+\) \(count_over_time\()?\{service=~?"', target["expr"])
            assert target["expr"].count("(") == target["expr"].count(")")
            assert target["expr"].count('"') % 2 == 0
    by_status = next(e for e in exprs if e.startswith("sum by (status)"))
    assert '| json | logger="ufcal.score" | status >= 400' in by_status
    assert "[$__auto]" in by_status
    engine = [e for e in exprs if "ERROR" in e]
    assert any('logger=~"vllm.*' in e for e in engine), "engine errors include vLLM's lines"


@pytest.mark.parametrize("logger", ["ufcal.score"])
def test_the_failed_score_query_matches_a_real_score_line(logger: str) -> None:
    """The LogQL filters name fields that ufcal's failed "scored" line really has."""
    from service.telemetry import score_log_fields

    fields = score_log_fields(
        request_id="x", model="m", method="uf", mode="logprobs", answer=None, confidence=None,
        uncertainty=None, engine_calls=1, latency_ms=3.0, status=504, error="deadline",
    )  # fmt: skip
    record = logging.LogRecord(logger, logging.INFO, __file__, 1, "scored", None, None)
    record.fields = fields
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "ufcal.score" and line["status"] >= 400
