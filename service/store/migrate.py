"""Bring a database to the store's schema with Alembic: at start-up and by
``ufcal db upgrade``. The migrations ship inside the package (``migrations/``), so an
installed ufcal finds them without an alembic.ini."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.backends import Backend, backend_for

if TYPE_CHECKING:
    from service.config import Settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the packaged migrations, on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this ufcal knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


def _upgrade(connection: Connection) -> str | None:
    command.upgrade(alembic_config(connection), "head")
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, backend: Backend) -> str | None:
    """Run every pending migration in one transaction; replicas starting together take
    turns (a PostgreSQL advisory lock). Returns the revision the database is at."""
    async with engine.begin() as conn:
        await backend.lock_for_migrations(conn)
        return await conn.run_sync(_upgrade)


async def upgrade_database(database: str | Path, timeout_s: float) -> str | None:
    """Migrate the database ``database`` names to the newest schema; its revision."""
    backend = backend_for(database, timeout_s)
    engine = backend.create_engine()
    try:
        async with asyncio.timeout(max(30.0, 3 * timeout_s)):
            return await upgrade(engine, backend)
    finally:
        await engine.dispose()


def db_command(args: argparse.Namespace, settings: Settings) -> int:
    """``ufcal db upgrade``: one JSON line on stdout, or the reason on stderr and exit 1."""
    from service.store.store import _reason

    database = settings.database()
    try:
        backend = backend_for(database, settings.db_timeout_s)
    except ValueError as exc:
        print(f"ufcal db {args.action}: {exc}", file=sys.stderr)
        return 1
    try:
        revision = asyncio.run(upgrade_database(database, settings.db_timeout_s))
    except Exception as exc:
        print(
            f"ufcal db {args.action}: {backend.where()}: {_reason(exc, backend)}", file=sys.stderr
        )
        return 1
    print(json.dumps({"database": backend.where(), "revision": revision}))
    return 0
