"""The poller in one process, on a real Postgres: outcomes, leases, fencing, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from runtime.db import migrate
from runtime.errors import PermanentError, TransientError
from runtime.poller import Job, JobResult, Poller, PostgresJobStore
from runtime.services import LocalPostgres

RESULT = JobResult(file_content="raw", boosted_file_content="boosted")


async def _done(job: Job) -> JobResult:
    return RESULT


def _poller(store: PostgresJobStore, handler: Callable[[Job], Awaitable[JobResult]],
            **options: Any) -> Poller:  # fmt: skip
    settings: dict[str, Any] = {
        "worker_id": "w1",
        "worker_types": ["index", "acte"],
        "concurrency": 4,
        "lease_s": 2.0,
        "poll_interval_s": 0.05,
        "drain_s": 2.0,
        "backoff_base_s": 0.2,
        "backoff_max_s": 1.0,
    }
    return Poller(store, handler, **{**settings, **options})


@asynccontextmanager
async def running(*pollers: Poller) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        yield tasks
    finally:
        for poller in pollers:
            poller.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresJobStore]:
    job_store = await PostgresJobStore.connect(database_url)
    yield job_store
    await job_store.close()


async def insert(db: asyncpg.Connection, source: str, count: int, **columns: Any) -> list[Any]:
    names = ["document_source", "status_id", *columns]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(names)))
    statement = (
        f"INSERT INTO extraction_queue ({', '.join(names)}) VALUES ({placeholders}) RETURNING id"
    )
    return [await db.fetchval(statement, source, 3, *columns.values()) for _ in range(count)]


async def statuses(db: asyncpg.Connection) -> dict[int, int]:
    rows = await db.fetch("SELECT status_id, count(*) FROM extraction_queue GROUP BY 1")
    return {row[0]: row[1] for row in rows}


async def test_all_ready_rows_of_the_configured_types_are_done(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    await insert(db, "index", 20, error_message="scraper's")
    await insert(db, "acte", 20)
    plans = await insert(db, "plan_cadastraux", 5)
    poller = _poller(store, _done)
    async with running(poller):
        await wait_for(lambda: _count(db, "status_id = 5", 40))
    rows = await db.fetch(
        "SELECT * FROM extraction_queue WHERE document_source <> 'plan_cadastraux'"
    )
    assert {(r["status_id"], r["ocr_attempts"], r["file_content"]) for r in rows} == {(5, 1, "raw")}
    assert {r["error_message"] for r in rows if r["document_source"] == "index"} == {"scraper's"}
    for plan in plans:
        assert await db.fetchval("SELECT status_id FROM extraction_queue WHERE id = $1", plan) == 3
    assert poller.stats.done == poller.stats.claimed == 40
    assert await db.fetchval("SELECT count(*) FROM ocr_worker_leases") == 0, "lease not dropped"


async def _count(db: asyncpg.Connection, where: str, expected: int) -> bool:
    return bool(
        await db.fetchval(f"SELECT count(*) FROM extraction_queue WHERE {where}") == expected
    )


async def test_a_document_that_always_fails_ends_in_error_with_backoff(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    (row_id,) = await insert(db, "index", 1, ocr_max_attempts=3)
    calls: list[float] = []

    async def failing(job: Job) -> JobResult:
        calls.append(time.monotonic())
        raise TransientError(f"model overloaded (attempt {job.attempts})")

    poller = _poller(store, failing, backoff_base_s=0.4, backoff_max_s=2.0)
    async with running(poller):
        await wait_for(lambda: _count(db, "status_id = 4", 1))
    row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", row_id)
    assert (row["ocr_attempts"], row["ocr_error"]) == (3, "model overloaded (attempt 3)")
    assert row["ocr_last_error_at"] is not None
    assert len(calls) == 3
    # Backoff after attempt n is at least half of base * 2^(n-1): 0.2 s, then 0.4 s.
    assert calls[1] - calls[0] >= 0.2
    assert calls[2] - calls[1] >= 0.4
    assert (poller.stats.retried, poller.stats.failed) == (2, 1)


async def test_permanent_and_unexpected_errors(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    (bad,) = await insert(db, "acte", 1, document_number="bad")
    (buggy,) = await insert(db, "acte", 1, document_number="buggy")

    async def handler(job: Job) -> JobResult:
        if job.document_number == "bad":
            raise PermanentError("not a PDF")
        raise ValueError("page 3 has no text")

    poller = _poller(store, handler, backoff_base_s=30.0, backoff_max_s=600.0)
    async with running(poller):
        await wait_for(lambda: _count(db, "ocr_error IS NOT NULL", 2))
    bad_row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", bad)
    assert (bad_row["status_id"], bad_row["ocr_attempts"]) == (4, 1)
    assert bad_row["ocr_error"] == "not a PDF"
    buggy_row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", buggy)
    assert buggy_row["status_id"] == 3
    assert buggy_row["ocr_error"] == "ValueError: page 3 has no text"
    wait = await db.fetchval(
        "SELECT extract(epoch FROM ocr_not_before - ocr_last_error_at) FROM extraction_queue"
        " WHERE id = $1",
        buggy,
    )
    assert 15 <= wait <= 30


async def test_a_late_result_after_the_lease_was_lost_is_dropped(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    (row_id,) = await insert(db, "acte", 1)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(job: Job) -> JobResult:
        started.set()
        await release.wait()
        return JobResult("late", "late")

    poller = _poller(store, slow)
    async with running(poller):
        await started.wait()
        # Someone else now holds the row (as after a recovery and a new claim).
        await db.execute(
            "UPDATE extraction_queue SET ocr_claim_id = gen_random_uuid(), ocr_worker_id = 'w2'"
        )
        release.set()
        await wait_for(lambda: _lost(poller))
    row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", row_id)
    assert (row["status_id"], row["ocr_worker_id"], row["file_content"]) == (6, "w2", None)
    assert poller.stats.done == 0


async def _lost(poller: Poller) -> bool:
    return poller.stats.lost_leases == 1


async def test_a_slow_healthy_job_is_never_taken_away(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    (row_id,) = await insert(db, "index", 1)
    calls: list[str] = []

    async def slow(job: Job) -> JobResult:
        calls.append(job.document_source)
        await asyncio.sleep(3.0)  # longer than the lease: the heartbeat keeps it ours
        return RESULT

    first = _poller(store, slow, worker_id="slow", lease_s=1.0)
    other = _poller(store, _done, worker_id="sweeper", lease_s=1.0)
    async with running(first):
        await wait_for(lambda: _count(db, "status_id = 6", 1))
        async with running(other):  # sweeps every quarter lease while the slow job runs
            await wait_for(lambda: _count(db, "status_id = 5", 1))
    row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", row_id)
    assert (row["ocr_attempts"], row["ocr_worker_id"]) == (1, "slow")
    assert calls == ["index"]
    assert other.stats.recovered == 0


async def test_shutdown_drains_then_hands_back_unattempted(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    (quick,) = await insert(db, "acte", 1, document_number="quick")
    (stuck,) = await insert(db, "acte", 1, document_number="stuck")
    cancelled: list[str] = []

    async def handler(job: Job) -> JobResult:
        try:
            await asyncio.sleep(0.3 if job.document_number == "quick" else 60)
        except asyncio.CancelledError:
            cancelled.append(job.document_number or "")
            raise
        return RESULT

    poller = _poller(store, handler, drain_s=1.0)
    async with running(poller):
        await wait_for(lambda: _count(db, "status_id = 6", 2))
        poller.stop()
        await wait_for(lambda: _count(db, "status_id = 5", 1))
        # Stopped: nothing new is claimed during the drain.
        await insert(db, "acte", 1, document_number="new")
    assert cancelled == ["stuck"]
    stuck_row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", stuck)
    assert (stuck_row["status_id"], stuck_row["ocr_attempts"]) == (3, 0)
    quick_row = await db.fetchrow("SELECT * FROM extraction_queue WHERE id = $1", quick)
    assert quick_row["status_id"] == 5
    assert await _count(db, "document_number = 'new' AND ocr_attempts = 0", 1)
    assert poller.stats.handed_back == 1


async def test_cancelling_the_poller_hands_back_its_jobs(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    await insert(db, "index", 3)

    async def endless(job: Job) -> JobResult:
        await asyncio.sleep(60)
        return RESULT

    poller = _poller(store, endless)
    task = asyncio.create_task(poller.run())
    await wait_for(lambda: _count(db, "status_id = 6", 3))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await statuses(db) == {3: 3}
    assert await _count(db, "ocr_attempts = 0", 3)
    assert await db.fetchval("SELECT count(*) FROM ocr_worker_leases") == 0


async def test_a_slot_that_frees_after_a_full_claim_is_refilled_at_once(
    db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    await insert(db, "acte", 12)
    poller = _poller(store, _done, concurrency=2, poll_interval_s=30.0)
    async with running(poller):
        # With a 30 s poll interval, only the "claim again at once" rule finishes in time.
        await wait_for(lambda: _count(db, "status_id = 5", 12), timeout_s=5)


async def test_notifications_wake_an_idle_poller(
    database_url: str, db: asyncpg.Connection, store: PostgresJobStore
) -> None:
    await migrate(database_url, notify=True)
    poller = _poller(store, _done, poll_interval_s=30.0)
    async with running(poller):
        await asyncio.sleep(0.3)  # idle now, next poll in about 30 s
        await insert(db, "index", 1)
        await wait_for(lambda: _count(db, "status_id = 5", 1), timeout_s=5)


@pytest.mark.slow
async def test_a_postgres_restart_loses_nothing(
    pg_server: LocalPostgres, db: asyncpg.Connection, database_url: str
) -> None:
    await insert(db, "index", 30)
    await insert(db, "acte", 30)
    await db.close()
    finished: list[Any] = []

    async def handler(job: Job) -> JobResult:
        await asyncio.sleep(0.4)
        finished.append(job.id)
        return RESULT

    stores = [await PostgresJobStore.connect(database_url) for _ in range(2)]
    pollers = [
        _poller(s, handler, worker_id=f"w{i}", lease_s=6.0, concurrency=5)
        for i, s in enumerate(stores)
    ]
    try:
        async with running(*pollers):
            await asyncio.sleep(1.0)
            pg_server.stop()
            await asyncio.sleep(1.0)  # jobs in flight finish while the database is down
            pg_server.start()
            connection = await asyncpg.connect(database_url)
            try:
                await wait_for(lambda: _count(connection, "status_id = 5", 60), timeout_s=30)
                rows = await connection.fetch("SELECT ocr_attempts FROM extraction_queue")
            finally:
                await connection.close()
    finally:
        pg_server.start()
        for s in stores:
            await s.close()
    assert sorted(finished) == sorted(set(finished)), "a job ran twice"
    assert len(finished) == 60
    assert {row["ocr_attempts"] for row in rows} == {1}
    assert sum(p.stats.done for p in pollers) == 60
    assert sum(p.stats.lost_leases for p in pollers) == 0
