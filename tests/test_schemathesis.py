"""Property-based fuzzing of every endpoint from the service's own ``/openapi.json``
(schemathesis): no 5xx, and every reply conforms to the schema (status code declared,
content type, body schema). Run against the fast fake engine in a real uvicorn process,
with API keys on (the generated cases carry a valid key).

The number of cases is printed and written to ``schemathesis.json`` in a temp dir (run
with -s); docs/reliability.md quotes it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from tests.servers import ServerProcess, fake_server, running

KEY = "fuzz-key-0123456789"
EXAMPLES_PER_OPERATION = 150
NEGATIVE_EXAMPLES = 60
MIN_TOTAL_CASES = 500
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("fuzz")
    env = {
        "UFCAL_API_KEYS": KEY,
        "UFCAL_DB_PATH": str(logs / "fuzz.db"),
        "UFCAL_MAX_BATCH_SIZE": "8",
        "UFCAL_MAX_CONCURRENCY": "64",
        "UFCAL_MAX_QUEUE": "64",
    }
    with running(fake_server(logs, "fuzz", env), "/readyz", 30) as server:
        yield server


def _fuzz(operation: Any, base_url: str, mode: GenerationMode, examples: int) -> None:
    """Run up to ``examples`` generated cases (valid or invalid input) on one operation."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call(
            base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        )
        CASES[f"{operation.label} ({mode.value})"] += 1
        STATUSES[response.status_code] += 1
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )

    run()


def test_every_endpoint_conforms_and_never_5xx(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /score", "GET /healthz", "GET /readyz", "GET /metrics"} <= labels
    for operation in operations:
        _fuzz(operation, fuzz_server.base_url, GenerationMode.POSITIVE, EXAMPLES_PER_OPERATION)
        if operation.method.upper() == "POST":  # invalid bodies: 4xx as documented, never 5xx
            _fuzz(operation, fuzz_server.base_url, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
    total = sum(CASES.values())
    figures = {
        "cases": total,
        "by_operation": dict(sorted(CASES.items())),
        "by_status": {str(k): v for k, v in sorted(STATUSES.items())},
    }
    (tmp_path / "schemathesis.json").write_text(json.dumps(figures, indent=2))
    print("\nschemathesis figures:", json.dumps(figures))
    assert {k.split(" (")[0] for k in CASES} == labels  # every endpoint was exercised
    assert total >= MIN_TOTAL_CASES
    assert not any(code >= 500 for code in STATUSES)


async def test_fuzz_finding_tiny_temperature_is_not_a_500() -> None:
    """Found by this fuzzing: temperature=5e-324 made every logprob / T overflow to -inf,
    so the letter softmax raised and /score answered 500. T -> 0 is the argmax."""
    from tests.test_api import GOOD, serve, white_box

    async with serve(white_box(), raise_app_exceptions=False) as client:
        r = await client.post("/score", json={**GOOD, "temperature": 5e-324, "mode": "logprobs"})
    assert r.status_code == 200, r.text
    assert r.json()["distribution"]["D"] == 1.0
