"""Test queues for the job store contract: the same operations on Postgres and in memory.

Time moves by ageing what is stored (Postgres) or by moving the clock (memory), so the
contract tests never sleep.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any
from uuid import UUID

import asyncpg

from runtime.poller import MemoryJobStore, PostgresJobStore

_AGE = """
UPDATE ocr_worker_leases
SET heartbeat_at = heartbeat_at - make_interval(secs => $1),
    started_at = started_at - make_interval(secs => $1);
"""
_AGE_ROWS = """
UPDATE extraction_queue
SET created_at = created_at - make_interval(secs => $1),
    ocr_started_at = ocr_started_at - make_interval(secs => $1),
    ocr_not_before = ocr_not_before - make_interval(secs => $1)
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class MemoryQueue:
    """A ``MemoryJobStore`` driven by a fake clock."""

    kind = "memory"

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryJobStore(self.clock)
        self._sequence = itertools.count()

    async def add(self, source: str | None, count: int = 1, **columns: Any) -> list[UUID]:
        ids = []
        for _ in range(count):
            created = self.clock.now - 3600 + next(self._sequence) * 0.001
            ids.append(self.store.add(source, created_at=created, **columns))
        return ids

    async def row(self, job_id: UUID) -> dict[str, Any]:
        return dataclasses.asdict(self.store.rows[job_id])

    async def age(self, seconds: float) -> None:
        self.clock.now += seconds

    async def close(self) -> None:
        await self.store.close()


class PostgresQueue:
    """A ``PostgresJobStore`` on a fresh database, and a side connection to look inside."""

    kind = "postgres"

    def __init__(self, store: PostgresJobStore, connection: asyncpg.Connection) -> None:
        self.store = store
        self.connection = connection
        self._sequence = itertools.count()

    @classmethod
    async def open(cls, dsn: str) -> PostgresQueue:
        store = await PostgresJobStore.connect(dsn)
        return cls(store, await asyncpg.connect(dsn))

    async def add(self, source: str | None, count: int = 1, **columns: Any) -> list[UUID]:
        columns.setdefault("status_id", 3)
        names = ["document_source", "created_at", *columns]
        rows = []
        for _ in range(count):
            offset = 3600 - next(self._sequence) * 0.001
            rows.append((source, offset, *columns.values()))
        values = ", ".join(
            f"${i + 1}" if name != "created_at" else f"now() - make_interval(secs => ${i + 1})"
            for i, name in enumerate(names)
        )
        statement = (
            f"INSERT INTO extraction_queue ({', '.join(names)}) VALUES ({values}) RETURNING id"
        )
        return [await self.connection.fetchval(statement, *row) for row in rows]

    async def row(self, job_id: UUID) -> dict[str, Any]:
        row = await self.connection.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", job_id)
        assert row is not None
        return dict(row)

    async def age(self, seconds: float) -> None:
        await self.connection.execute(_AGE, float(seconds))
        await self.connection.execute(_AGE_ROWS, float(seconds))

    async def close(self) -> None:
        await self.connection.close()
        await self.store.close()
