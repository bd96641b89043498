"""The two database configurations the store runs on, chosen by the URL's scheme.

Everything the store does is written once in SQLAlchemy Core; a configuration only says how
to connect, how durable a commit of scores or of feedback is, which ``INSERT`` construct
carries ``ON CONFLICT``, and how processes take a lock:

* :class:`SqliteBackend` (``sqlite:///path``, the embedded default): one connection in WAL
  mode; feedback commits with ``synchronous=FULL`` (the WAL is fsynced before the commit
  returns), batches of scores with ``synchronous=NORMAL`` (no fsync: an OS crash may drop
  the last scores, never a label); locks are in-process, there is only one process.
* :class:`PostgresBackend` (``postgresql://user:password@host:port/db``, through asyncpg): a
  pool shared by the requests of one replica; feedback commits with PostgreSQL's default
  ``synchronous_commit=on``, batches of scores with ``synchronous_commit=off`` (the same
  trade as SQLite's NORMAL); locks are session advisory locks, so they hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["Backend", "PostgresBackend", "SqliteBackend", "backend_for", "describe_url"]

#: The schemes UFCAL_DB_URL accepts (the driver is always the async one the store uses).
SQLITE_SCHEMES = ("sqlite", "sqlite+aiosqlite")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (PostgreSQL's advisory lock space); hashlib,
    so every replica derives the same key (Python's ``hash()`` is salted per process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def describe_url(url: URL) -> str:
    """Where the database is, for messages: never the password."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite file {url.database or ':memory:'}"
    host = url.host or "localhost"
    port = f":{url.port}" if url.port else ""
    return f"postgresql at {host}{port}/{url.database or ''} as {url.username or '(default)'}"


class Backend:
    """How the store talks to one kind of database."""

    name: ClassVar[str]
    #: Several processes may share the database (the live window must be re-read).
    shared: ClassVar[bool]
    insert: ClassVar[Callable[..., Any]]

    def __init__(self, url: URL, timeout_s: float, pool_size: int = 8) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self._local_locks: dict[str, asyncio.Lock] = {}

    @property
    def operation_timeout_s(self) -> float:
        """How long one feedback may take before the store reports the database down."""
        return self.timeout_s

    def storable(self, key: str) -> bool:
        """Whether ``key`` can be a primary key here."""
        return True

    def text(self, value: str | None) -> str | None:
        """``value`` as this database can keep it."""
        return value

    def where(self) -> str:
        """The database's place, for messages (no password)."""
        return describe_url(self.url)

    def create_engine(self) -> AsyncEngine:
        raise NotImplementedError

    async def prepare_scores(self, conn: AsyncConnection) -> None:
        """Before a transaction of scores: commit without waiting for the disk."""

    async def prepare_feedback(self, conn: AsyncConnection) -> None:
        """Before a transaction of feedback: commit only once it is on disk."""

    async def before_close(self, engine: AsyncEngine) -> None:
        """Tidy up before the connections close."""

    async def lock_for_migrations(self, conn: AsyncConnection) -> None:
        """Inside the migration transaction: one process migrates at a time."""

    @contextlib.asynccontextmanager
    async def try_lock(self, engine: AsyncEngine, name: str) -> AsyncIterator[bool]:
        """Yield whether this process holds the lock ``name`` (never waits for it)."""
        lock = self._local_locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            yield False
            return
        async with lock:
            yield True


class SqliteBackend(Backend):
    name = "sqlite"
    shared = False
    insert = staticmethod(sqlite.insert)

    def create_engine(self) -> AsyncEngine:
        path = self.url.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer anyway, and the store's writes queue on it
        # in order instead of on the file lock (":memory:" gets SQLAlchemy's static pool,
        # one connection too, or each connection would see its own empty database).
        pool: dict[str, Any] = {}
        if path and path != ":memory:":
            pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": self.operation_timeout_s}
        engine = create_async_engine(
            self.url.set(drivername="sqlite+aiosqlite"), connect_args={"timeout": 30.0}, **pool
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.close()

        return engine

    @property
    def operation_timeout_s(self) -> float:
        # A local file: only a very slow disk takes this long (the busy timeout is 30 s).
        return max(30.0, self.timeout_s)

    async def prepare_scores(self, conn: AsyncConnection) -> None:
        await conn.exec_driver_sql("PRAGMA synchronous = NORMAL")

    async def prepare_feedback(self, conn: AsyncConnection) -> None:
        await conn.exec_driver_sql("PRAGMA synchronous = FULL")

    async def before_close(self, engine: AsyncEngine) -> None:
        """Fold the WAL back into the database file."""
        async with engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


class PostgresBackend(Backend):
    name = "postgresql"
    shared = True
    insert = staticmethod(postgresql.insert)

    @property
    def operation_timeout_s(self) -> float:
        # Beyond the connect and statement timeouts: waiting for a free pooled connection
        # behind a burst of feedback is back-pressure, not an outage.
        return max(30.0, 3 * self.timeout_s)

    def create_engine(self) -> AsyncEngine:
        engine = create_async_engine(
            self.url.set(drivername="postgresql+asyncpg"),
            pool_size=self.pool_size,
            max_overflow=0,
            pool_timeout=self.operation_timeout_s,
            pool_pre_ping=True,  # a restarted server's dead connections are replaced
            # An unreachable server fails the connect after timeout_s; a statement that
            # hangs (a server gone without a reset) after twice that.
            connect_args={
                "timeout": self.timeout_s,
                "command_timeout": 2 * self.timeout_s,
                # Score batches commit without waiting for the WAL flush (one round trip
                # fewer than a SET LOCAL per batch); feedback turns it on for its own
                # transaction (prepare_feedback).
                "server_settings": {"synchronous_commit": "off"},
            },
        )
        return engine

    def storable(self, key: str) -> bool:
        return "\x00" not in key  # PostgreSQL text cannot hold NUL

    def text(self, value: str | None) -> str | None:
        return None if value is None else value.replace("\x00", "\ufffd")

    async def prepare_feedback(self, conn: AsyncConnection) -> None:
        # Explicit, whatever the server's default: the commit waits for the WAL flush.
        await conn.exec_driver_sql("SET LOCAL synchronous_commit = on")

    async def lock_for_migrations(self, conn: AsyncConnection) -> None:
        await conn.execute(select(func.pg_advisory_xact_lock(lock_key("ufcal:migrations"))))

    @contextlib.asynccontextmanager
    async def try_lock(self, engine: AsyncEngine, name: str) -> AsyncIterator[bool]:
        async with super().try_lock(engine, name) as local:
            if not local:
                yield False
                return
            key = lock_key(name)
            async with engine.connect() as conn:
                got = bool((await conn.execute(select(func.pg_try_advisory_lock(key)))).scalar())
                try:
                    yield got
                finally:
                    if got:
                        await conn.execute(select(func.pg_advisory_unlock(key)))
                    await conn.commit()


def parse_url(url: str) -> URL:
    """``url`` as SQLAlchemy's URL; ``ValueError`` naming the accepted schemes otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            "UFCAL_DB_URL is not a database URL: use sqlite:///path or "
            "postgresql://user:password@host:port/database"
        ) from None
    if parsed.drivername not in SQLITE_SCHEMES + POSTGRES_SCHEMES:
        raise ValueError(
            f"UFCAL_DB_URL scheme {parsed.drivername!r} is not supported: use sqlite:///path "
            "or postgresql://user:password@host:port/database"
        )
    return parsed


def backend_for(url: str | Path, timeout_s: float = 5.0, pool_size: int = 8) -> Backend:
    """The configuration for ``url`` (``sqlite:///...``, ``postgresql://...``) or a path."""
    if isinstance(url, Path) or "://" not in url:
        return SqliteBackend(URL.create("sqlite", database=str(url)), timeout_s)
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return SqliteBackend(parsed, timeout_s)
    return PostgresBackend(parsed, timeout_s, pool_size)
