"""Optional API keys: bearer tokens, 401 with a challenge, open health probes, /metrics
open or protected, constant-time comparison, keys never logged, the OpenAPI scheme."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi import FastAPI

from service.api.app import create_app
from service.api.security import SCHEME_NAME, ApiKeys
from tests.test_api import GOOD, _settings, serve, white_box

KEYS = "k-first-0123456789,k-second-abcdef"
SECOND = {"Authorization": "Bearer k-second-abcdef"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer k-second-abcde"},  # a prefix of a key
        {"Authorization": "Bearer k-second-abcdefX"},
        {"Authorization": "Basic k-second-abcdef"},
        {"Authorization": "k-second-abcdef"},
        {"X-API-Key": "k-second-abcdef"},
    ],
    ids=["none", "wrong", "prefix", "longer", "basic", "bare", "other-header"],
)
async def test_missing_or_wrong_key_is_401_with_challenge(headers: dict[str, str]) -> None:
    engine = white_box()
    async with serve(engine, _settings(api_keys=KEYS)) as client:
        r = await client.post("/score", json=GOOD, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in r.json()["detail"]
    assert engine.calls == []


async def test_each_configured_key_works() -> None:
    async with serve(white_box(), _settings(api_keys=KEYS)) as client:
        first = await client.post(
            "/score", json=GOOD, headers={"Authorization": "Bearer k-first-0123456789"}
        )
        second = await client.post("/score", json=GOOD, headers=SECOND)
        lower = await client.post(
            "/score", json=GOOD, headers={"Authorization": "bearer k-first-0123456789"}
        )
    assert [first.status_code, second.status_code, lower.status_code] == [200, 200, 200]


async def test_no_keys_configured_means_open() -> None:
    async with serve(white_box()) as client:
        r = await client.post("/score", json=GOOD)
    assert r.status_code == 200


async def test_batch_endpoint_is_protected_too() -> None:
    """Secure by default: every route but the open ones needs a key."""
    async with serve(white_box(), _settings(api_keys=KEYS)) as client:
        r = await client.post("/score/batch", json={"items": [GOOD]})
        ok = await client.post("/score/batch", json={"items": [GOOD]}, headers=SECOND)
    assert r.status_code == 401
    assert ok.status_code == 200


async def test_health_probes_stay_open() -> None:
    async with serve(white_box(), _settings(api_keys=KEYS)) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize(("metrics_auth", "status"), [(False, 200), (True, 401)])
async def test_metrics_open_or_protected(metrics_auth: bool, status: int) -> None:
    async with serve(white_box(), _settings(api_keys=KEYS, metrics_auth=metrics_auth)) as client:
        r = await client.get("/metrics")
        with_key = await client.get("/metrics", headers=SECOND)
    assert r.status_code == status
    assert with_key.status_code == 200
    assert "ufcal_engine_up" in with_key.text


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is compared with hmac.compare_digest on equal-length digests."""
    import service.api.security as security

    compared: list[tuple[int, int]] = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    keys = ApiKeys(["short", "a-much-longer-key"])
    assert keys.accepts("short")
    assert not keys.accepts("x")
    assert compared == [(32, 32)] * 4  # both keys each time, no early exit
    assert "short" not in repr(keys)


async def test_keys_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(white_box(), _settings(api_keys=KEYS)) as client:
        await client.post("/score", json=GOOD, headers={"Authorization": "Bearer wrong-key-xyz"})
        await client.post("/score", json=GOOD, headers=SECOND)
    text = caplog.text + " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "k-second-abcdef" not in text
    assert "k-first-0123456789" not in text
    assert "wrong-key-xyz" not in text


def test_openapi_declares_the_bearer_scheme() -> None:
    app: FastAPI = create_app(_settings(api_keys=KEYS), engine=white_box())
    doc: dict[str, Any] = app.openapi()
    scheme = doc["components"]["securitySchemes"][SCHEME_NAME]
    assert scheme == {"type": "http", "scheme": "bearer", "description": scheme["description"]}
    paths = doc["paths"]
    assert paths["/score"]["post"]["security"] == [{SCHEME_NAME: []}]
    assert "401" in paths["/score"]["post"]["responses"]
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in paths[open_path]["get"]
        assert "401" not in paths[open_path]["get"]["responses"]
    protected = create_app(_settings(metrics_auth=True), engine=white_box()).openapi()
    assert protected["paths"]["/metrics"]["get"]["security"] == [{SCHEME_NAME: []}]


async def test_api_docs_stay_open_and_unknown_paths_need_a_key() -> None:
    async with serve(white_box(), _settings(api_keys=KEYS)) as client:
        schema = await client.get("/openapi.json")
        docs = await client.get("/docs")
        unknown = await client.get("/no-such-path")
        unknown_with_key = await client.get("/no-such-path", headers=SECOND)
    assert (schema.status_code, docs.status_code) == (200, 200)
    assert unknown.status_code == 401
    assert unknown_with_key.status_code == 404
