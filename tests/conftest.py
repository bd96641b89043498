"""Session fixtures: the embedded model, a real vLLM OpenAI server on it, and real
``ufcal serve`` processes (one on that server, one with the in-process engine)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.postgres import PostgresServer, postgres_server
from tests.postgres import available as postgres_available
from tests.servers import SHARED_DATA, ServerProcess, running, ufcal_server, vllm_server

# Raise it on a machine shared with other heavy jobs (vLLM's CPU start-up takes minutes there).
START_TIMEOUT_S = float(os.environ.get("UFCAL_TEST_START_TIMEOUT_S", "300"))
# The integration servers check correctness, not latency: a deadline that a loaded 2-core CI
# machine cannot miss (the deadline itself is tested in test_overload / test_engine_kill).
CORRECTNESS_ENV = {"UFCAL_REQUEST_TIMEOUT_S": "600"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Apps and servers built by the tests keep their SQLite store (UFCAL_DB_PATH) in a
    temporary folder, never in the checkout."""
    saved = os.environ.get("UFCAL_DB_PATH")
    os.environ["UFCAL_DB_PATH"] = str(tmp_path_factory.mktemp("db") / "ufcal.db")
    yield
    if saved is None:
        os.environ.pop("UFCAL_DB_PATH", None)
    else:
        os.environ["UFCAL_DB_PATH"] = saved


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's package, started as the postgres user) for the session."""
    if not postgres_available():
        msg = "PostgreSQL is not installed (make tools installs Debian's postgresql)"
        if os.environ.get("UFCAL_REQUIRE_DEPLOY_TOOLS", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes empty databases of one backend: a SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        numbers = itertools.count()
        return lambda: str(tmp_path / f"store{next(numbers)}.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database


@pytest.fixture
def db(new_db: Callable[[], str]) -> str:
    """One empty database of each backend (the store's tests run on both)."""
    return new_db()


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from service.config import Settings
    from service.engines.embedded import prepare_embedded_model

    return prepare_embedded_model(Settings().model_cache)


@pytest.fixture(scope="session")
def vllm(model_dir: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """A real vLLM OpenAI-compatible server serving the embedded SmolLM2 on CPU."""
    with running(vllm_server(model_dir, server_logs), "/health", START_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="session")
def ufcal_remote(vllm: ServerProcess, server_logs: Path) -> Iterator[ServerProcess]:
    """``ufcal serve`` using the vLLM server through UFCAL_ENGINE_URL."""
    env = {
        **CORRECTNESS_ENV,
        "UFCAL_ENGINE_URL": vllm.base_url,
        "UFCAL_DB_PATH": str(server_logs / "ufcal-remote.db"),
    }
    server = ufcal_server(server_logs, "ufcal-remote", env)
    with running(server, "/readyz", START_TIMEOUT_S) as started:
        yield started


@pytest.fixture(scope="session")
def ufcal_local(model_dir: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """``ufcal serve`` with the in-process vLLM engine on the embedded model (make serve)."""
    env = {**CORRECTNESS_ENV, "UFCAL_DB_PATH": str(server_logs / "ufcal-local.db")}
    server = ufcal_server(server_logs, "ufcal-local", env)
    with running(server, "/readyz", START_TIMEOUT_S) as started:
        yield started


def load_questions(name: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` questions of a shared MCQA file."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"evaluation data missing: {path} (../shared must sit beside the repo)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    return rows
