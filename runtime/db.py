"""Schema management: ``db init`` for development databases, ``db migrate`` for production."""

from __future__ import annotations

from importlib import resources

import asyncpg

from runtime.errors import ConfigurationError, ServiceError

# Serialises concurrent migrations (several workers started at once); an arbitrary key.
_MIGRATION_LOCK = 0x5245_4749_4F43_52  # "REGIOCR"


def read_sql(name: str) -> str:
    """The text of a named SQL file shipped in ``runtime/sql``."""
    return resources.files("runtime.sql").joinpath(name).read_text(encoding="utf-8")


async def _apply(dsn: str, *names: str) -> None:
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServiceError(f"cannot connect to Postgres: {exc}") from exc
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            for name in names:
                await connection.execute(read_sql(name))
    except asyncpg.UndefinedTableError as exc:
        raise ConfigurationError(
            "DATABASE_URL",
            f"{exc}: this database has no extractor tables; point DATABASE_URL at the "
            "extractor's database, or run `db init` for a development database",
        ) from exc
    except asyncpg.PostgresError as exc:
        raise ServiceError(f"schema change failed: {exc}") from exc
    finally:
        await connection.close()


async def init_schema(dsn: str) -> None:
    """Create the extractor's tables (if missing) and the runtime's additions."""
    await _apply(dsn, "schema.sql", "migrate.sql")


async def migrate(dsn: str, *, notify: bool = False) -> None:
    """Add what the runtime needs to an existing extractor database.

    ``notify`` also installs the optional trigger that wakes idle workers when rows
    become ready (they poll either way).
    """
    await _apply(dsn, "migrate.sql", *(["notify.sql"] if notify else []))
