"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package (``make tools``
installs it), a throwaway cluster in a temporary folder owned by the ``postgres`` user
(initdb refuses to run as root), listening on 127.0.0.1 with password authentication."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port

SUPERUSER = "postgres"
PASSWORD = "ufcal-test-secret"


def pg_bin(tool: str) -> str | None:
    """``tool`` from the newest installed PostgreSQL (Debian keeps them off PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found[-1] if found else shutil.which(tool)


def _as_postgres(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        prefix + argv, capture_output=True, text=True, check=True, timeout=120, **kwargs
    )


class PostgresServer:
    """One cluster: ``url(db)`` gives a ``postgresql://`` URL, ``stop``/``start`` cut it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "postgres.log"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, SUPERUSER)
        _as_postgres(
            [
                str(pg_bin("initdb")), "-D", str(self.data), "-U", SUPERUSER,
                f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--no-sync",
            ]
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
            " -c max_connections=200 -c shared_buffers=32MB"
        )
        _as_postgres(
            [str(pg_bin("pg_ctl")), "-D", str(self.data), "-l", str(self.log), "-o", options,
             "-w", "-t", "60", "start"]
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        _as_postgres([str(pg_bin("pg_ctl")), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = pg_bin("psql")
        out = _as_postgres(
            [str(psql), "-h", str(self.root), "-p", str(self.port), "-d", database,
             "-U", SUPERUSER, "-At", "-c", sql]
        )  # fmt: skip
        return out.stdout.strip()

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)


def available() -> bool:
    return pg_bin("initdb") is not None and pg_bin("pg_ctl") is not None


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway PostgreSQL, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ufcal-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to postgres
        shutil.chown(root, SUPERUSER)
    root.chmod(0o700)
    server = PostgresServer(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
