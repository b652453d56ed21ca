"""``db init`` and ``db migrate`` on a real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from runtime.db import init_schema, migrate, read_sql
from runtime.errors import ConfigurationError

_SNAPSHOT = """
SELECT 'column' AS kind, table_name || '.' || column_name || ' ' || data_type
       || ' default=' || coalesce(column_default, '') AS what
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'status', id || ' ' || name FROM extraction_status
ORDER BY 1, 2
"""


async def _snapshot(dsn: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        return [(r["kind"], r["what"]) for r in await connection.fetch(_SNAPSHOT)]
    finally:
        await connection.close()


async def test_init_creates_the_original_tables_and_is_idempotent(
    empty_database_url: str,
) -> None:
    await init_schema(empty_database_url)
    first = await _snapshot(empty_database_url)
    await init_schema(empty_database_url)
    assert await _snapshot(empty_database_url) == first

    columns = {what.split(" ")[0] for kind, what in first if kind == "column"}
    for name in (
        "id", "document_source", "document_number", "document_number_normalized",
        "circonscription_fonciere", "cadastre", "designation_secondaire", "acte_type",
        "status_id", "worker_id", "processing_started_at", "attemtps", "max_attempts",
        "retry_count", "error_message", "supabase_path", "file_content",
        "boosted_file_content", "ocr_worker_id", "ocr_started_at", "ocr_completed_at",
        "ocr_attempts", "ocr_max_attempts", "ocr_error", "ocr_last_error_at",
        "created_at", "updated_at",
    ):  # fmt: skip
        assert f"extraction_queue.{name}" in columns
    statuses = [what for kind, what in first if kind == "status"]
    assert statuses == [
        "1 En attente", "2 En traitement", "3 Complété", "4 Erreur",
        "5 Extraction Complété", "6 OCR en traitement",
    ]  # fmt: skip


async def test_rows_inserted_with_only_the_extractors_columns_get_defaults(
    database_url: str,
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "INSERT INTO extraction_queue (document_source, document_number, status_id)"
            " VALUES ('acte', '123', 3) RETURNING *"
        )
    finally:
        await connection.close()
    assert row is not None
    assert row["ocr_attempts"] == 0
    assert row["ocr_max_attempts"] == 3
    assert row["id"] is not None
    assert row["ocr_claim_id"] is None


async def test_migrate_on_an_existing_extractor_database_is_additive_and_idempotent(
    empty_database_url: str,
) -> None:
    connection = await asyncpg.connect(empty_database_url)
    try:
        # The extractor's own schema as it is in production, with a row and a column
        # that the runtime does not know about.
        await connection.execute(read_sql("schema.sql"))
        await connection.execute(
            "ALTER TABLE extraction_queue ADD COLUMN extractor_only text;"
            "INSERT INTO extraction_queue (document_source, status_id, extractor_only)"
            " VALUES ('index', 3, 'keep me');"
        )
        before = await _snapshot(empty_database_url)
        await migrate(empty_database_url)
        after_first = await _snapshot(empty_database_url)
        await migrate(empty_database_url)
        after_second = await _snapshot(empty_database_url)
        kept = await connection.fetchval("SELECT extractor_only FROM extraction_queue")
    finally:
        await connection.close()

    assert set(before) <= set(after_first), "migrate removed or changed something"
    assert after_second == after_first
    assert kept == "keep me"
    added = {what.split(" ")[0] for kind, what in set(after_first) - set(before)}
    assert "extraction_queue.ocr_claim_id" in added
    assert "ocr_worker_leases.heartbeat_at" in added


async def test_migrate_on_a_database_without_the_extractors_tables_says_so(
    empty_database_url: str,
) -> None:
    with pytest.raises(ConfigurationError, match="db init"):
        await migrate(empty_database_url)


async def test_migrate_notify_installs_a_trigger_that_announces_ready_rows(
    database_url: str,
) -> None:
    await migrate(database_url, notify=True)
    await migrate(database_url, notify=True)
    connection = await asyncpg.connect(database_url)
    heard: list[str] = []
    try:
        await connection.add_listener("extraction_queue_ready", lambda *a: heard.append(a[3]))
        other = await asyncpg.connect(database_url)
        try:
            await other.execute(
                "INSERT INTO extraction_queue (document_source, status_id) VALUES ('acte', 3)"
            )
        finally:
            await other.close()
        for _ in range(50):
            if heard:
                break
            await asyncio.sleep(0.02)
    finally:
        await connection.close()
    assert heard
