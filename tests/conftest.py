"""Real servers for the tests: one Redis and one Postgres for the whole run.

Each test gets a clean Redis key space and, when it asks for a database, a database of
its own (cloned from a template that already holds the schema).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from runtime.db import init_schema
from runtime.services import LocalPostgres, LocalRedis

_TEMPLATE_DB = "queue_template"
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="registre-ocr-tests-") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[LocalRedis]:
    """A real redis-server; tests that kill or restart it must leave it running."""
    directory = services_dir / "redis"
    directory.mkdir()
    server = LocalRedis(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: LocalRedis) -> str:
    """The URL of an empty Redis."""
    redis_server.start()  # in case an earlier test stopped it
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture(scope="session")
def pg_server(services_dir: Path) -> Iterator[LocalPostgres]:
    """A real Postgres cluster; tests that restart it must leave it running."""
    directory = services_dir / "postgres"
    directory.mkdir()
    server = LocalPostgres(directory)
    server.start()

    async def make_template() -> None:
        admin = await asyncpg.connect(server.dsn())
        try:
            await admin.execute(f"CREATE DATABASE {_TEMPLATE_DB}")
        finally:
            await admin.close()
        await init_schema(server.dsn(_TEMPLATE_DB))

    asyncio.run(make_template())
    yield server
    server.stop()


async def _create_database(server: LocalPostgres, template: str) -> str:
    name = f"test_{next(_database_numbers)}"
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    return name


async def _drop_database(server: LocalPostgres, name: str) -> None:
    server.start()
    admin = await asyncpg.connect(server.dsn())
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(pg_server: LocalPostgres) -> AsyncIterator[str]:
    """A DSN to a fresh database with no tables at all."""
    pg_server.start()
    name = await _create_database(pg_server, "template0")
    yield pg_server.dsn(name)
    await _drop_database(pg_server, name)


@pytest.fixture
async def database_url(pg_server: LocalPostgres) -> AsyncIterator[str]:
    """A DSN to a fresh database holding the queue schema (``db init``), and no rows."""
    pg_server.start()
    name = await _create_database(pg_server, _TEMPLATE_DB)
    yield pg_server.dsn(name)
    await _drop_database(pg_server, name)


CommandRunner = Callable[..., "subprocess.CompletedProcess[str]"]
# Settings of the machine running the tests must not leak into the commands under test.
_RUNTIME_PREFIXES = ("GEMINI_", "WORKER_", "REDIS_", "DATABASE_", "MONITOR_", "DOCUMENTS_")


@pytest.fixture
def run_cli() -> CommandRunner:
    """Runs ``python -m runtime ARGS`` with only the given runtime variables set."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(_RUNTIME_PREFIXES)}
        environment.update(env, COLUMNS="160")
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=60,
            check=False,
        )

    return run
