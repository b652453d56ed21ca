"""The job store contract, run against ``PostgresJobStore`` and its in-memory twin."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from poller_queue import MemoryQueue, PostgresQueue

from runtime.poller import JobResult, PostgresJobStore
from runtime.poller.store import QUERIES

Queue = MemoryQueue | PostgresQueue
RESULT = JobResult(file_content="raw text", boosted_file_content="clean text")


@pytest.fixture(params=["memory", "postgres"])
async def queue(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Queue]:
    q: Queue
    if request.param == "memory":
        q = MemoryQueue()
    else:
        q = await PostgresQueue.open(database_url)
    yield q
    await q.close()


async def test_claim_takes_ready_rows_of_the_configured_types_oldest_first(queue: Queue) -> None:
    old_acte = await queue.add("acte", 2, document_number="A", acte_type="Acte")
    plans = await queue.add("plan_cadastraux", 3)
    index = await queue.add("index", 2, supabase_path="x.pdf", cadastre="C")
    scraping = await queue.add("acte", 1, status_id=2)

    jobs = await queue.store.claim_batch("w1", ["acte", "plan_cadastraux"], 10)

    assert [job.id for job in jobs] == old_acte
    job = jobs[0]
    assert (job.document_source, job.document_number, job.acte_type) == ("acte", "A", "Acte")
    assert (job.attempts, job.max_attempts) == (1, 3)
    row = await queue.row(job.id)
    assert row["status_id"] == 6
    assert row["ocr_worker_id"] == "w1"
    assert row["ocr_started_at"] is not None
    assert row["ocr_claim_id"] == job.claim_id
    for other in [*plans, *index, *scraping]:
        assert (await queue.row(other))["ocr_attempts"] == 0
    assert await queue.store.claim_batch("w1", ["acte"], 10) == []


async def test_claim_interleaves_types_so_neither_starves(queue: Queue) -> None:
    index = await queue.add("index", 6)  # older
    acte = await queue.add("acte", 6)

    first = await queue.store.claim_batch("w1", ["index", "acte"], 4)
    assert sorted(job.id for job in first) == sorted([*index[:2], *acte[:2]])
    # A batch of one goes to the type named first: the poller rotates that order.
    (one,) = await queue.store.claim_batch("w1", ["acte", "index"], 1)
    assert one.id == acte[2]
    (two,) = await queue.store.claim_batch("w1", ["index", "acte"], 1)
    assert two.id == index[2]
    # When one type runs dry, the other fills the batch.
    rest = await queue.store.claim_batch("w1", ["acte", "index"], 10)
    assert sorted(job.id for job in rest) == sorted([*index[3:], *acte[3:]])


async def test_complete_is_fenced_and_touches_only_ocr_columns(queue: Queue) -> None:
    (row_id,) = await queue.add("index", error_message="scraper note", ocr_error="old")
    (job,) = await queue.store.claim_batch("w1", ["index"], 1)

    assert await queue.store.complete(job, RESULT)
    row = await queue.row(row_id)
    assert row["status_id"] == 5
    assert (row["file_content"], row["boosted_file_content"]) == ("raw text", "clean text")
    assert row["ocr_completed_at"] is not None
    assert row["ocr_error"] is None
    assert row["error_message"] == "scraper note"
    # A write under another claim id changes nothing.
    stale = type(job)(**{**_fields(job), "claim_id": uuid.uuid4()})
    assert not await queue.store.complete(stale, JobResult("x", "y"))
    assert await queue.store.fail(stale, "late", permanent=False, backoff_s=0) is None
    assert not await queue.store.hand_back(stale)
    assert (await queue.row(row_id))["file_content"] == "raw text"


async def test_a_late_result_after_the_lease_was_lost_changes_nothing(queue: Queue) -> None:
    (row_id,) = await queue.add("acte")
    (job,) = await queue.store.claim_batch("dead", ["acte"], 1)
    await queue.store.heartbeat("dead", ["acte"], 10)
    await queue.age(11)
    recovery = await queue.store.recover(grace_s=10)
    assert recovery is not None
    assert (recovery.requeued, recovery.failed) == (1, 0)
    (again,) = await queue.store.claim_batch("alive", ["acte"], 1)
    assert again.id == job.id
    assert again.attempts == 2

    assert not await queue.store.complete(job, JobResult("late", "late"))
    assert await queue.store.fail(job, "late", permanent=True, backoff_s=0) is None
    row = await queue.row(row_id)
    assert (row["status_id"], row["ocr_worker_id"], row["file_content"]) == (6, "alive", None)
    assert await queue.store.complete(again, RESULT)


async def test_failures_back_off_then_end_in_error_after_max_attempts(queue: Queue) -> None:
    (row_id,) = await queue.add("index", ocr_max_attempts=2)
    (job,) = await queue.store.claim_batch("w1", ["index"], 1)
    assert await queue.store.fail(job, "boom 1", permanent=False, backoff_s=30) == 3
    row = await queue.row(row_id)
    assert (row["status_id"], row["ocr_error"]) == (3, "boom 1")
    assert row["ocr_last_error_at"] is not None

    await queue.age(29)
    assert await queue.store.claim_batch("w1", ["index"], 1) == [], "backoff not respected"
    await queue.age(2)
    (job,) = await queue.store.claim_batch("w1", ["index"], 1)
    assert job.attempts == 2
    assert await queue.store.fail(job, "boom 2", permanent=False, backoff_s=30) == 4
    row = await queue.row(row_id)
    assert (row["status_id"], row["ocr_error"], row["ocr_attempts"]) == (4, "boom 2", 2)
    await queue.age(60)
    assert await queue.store.claim_batch("w1", ["index"], 1) == []


async def test_a_permanent_failure_ends_at_once(queue: Queue) -> None:
    (row_id,) = await queue.add("acte")
    (job,) = await queue.store.claim_batch("w1", ["acte"], 1)
    assert await queue.store.fail(job, "not a PDF", permanent=True, backoff_s=30) == 4
    row = await queue.row(row_id)
    assert (row["status_id"], row["ocr_error"], row["ocr_attempts"]) == (4, "not a PDF", 1)


async def test_hand_back_does_not_count_the_attempt(queue: Queue) -> None:
    (row_id,) = await queue.add("acte")
    (job,) = await queue.store.claim_batch("w1", ["acte"], 1)
    assert await queue.store.hand_back(job)
    row = await queue.row(row_id)
    assert (row["status_id"], row["ocr_attempts"]) == (3, 0)
    # A retry (its first answer lost) reports success and does not count again.
    assert await queue.store.hand_back(job)
    assert (await queue.row(row_id))["ocr_attempts"] == 0
    (again,) = await queue.store.claim_batch("w2", ["acte"], 1)
    assert again.attempts == 1


async def test_recovery_takes_only_rows_of_lost_workers(queue: Queue) -> None:
    ids = await queue.add("index", 3)
    await queue.store.heartbeat("alive", ["index"], 10)
    await queue.store.heartbeat("dead", ["index"], 10)
    alive = await queue.store.claim_batch("alive", ["index"], 1)
    dead = await queue.store.claim_batch("dead", ["index"], 1)
    unregistered = await queue.store.claim_batch("unregistered", ["index"], 1)
    (last,) = await queue.add("index", 1, ocr_attempts=2)
    exhausted = await queue.store.claim_batch("dead", ["index"], 1)
    assert [j.id for j in alive + dead + unregistered + exhausted] == [*ids[:3], last]

    await queue.age(8)
    recovery = await queue.store.recover(grace_s=10)
    assert recovery is not None
    assert (recovery.requeued, recovery.failed) == (0, 0), "a live lease was taken"
    await queue.store.heartbeat("alive", ["index"], 10)  # a slow job, still renewed
    await queue.age(8)
    recovery = await queue.store.recover(grace_s=10)
    assert recovery is not None
    assert (recovery.requeued, recovery.failed) == (2, 1)
    statuses = [(await queue.row(i))["status_id"] for i in [*ids[:3], last]]
    assert statuses == [6, 3, 3, 4]
    lost = await queue.row(last)
    assert lost["ocr_error"].startswith("worker lost: dead")


async def test_queue_depth_counts_by_status_and_type(queue: Queue) -> None:
    await queue.add("index", 2)
    await queue.add("acte", 1)
    await queue.add("plan_cadastraux", 1, status_id=5)
    await queue.store.claim_batch("w1", ["index"], 1)
    assert await queue.store.queue_depth() == {
        (3, "index"): 1,
        (6, "index"): 1,
        (3, "acte"): 1,
        (5, "plan_cadastraux"): 1,
    }


def _fields(job: Any) -> dict[str, Any]:
    return {name: getattr(job, name) for name in job.__dataclass_fields__}


# -- Postgres only -------------------------------------------------------------------------


async def test_concurrent_claims_never_take_a_row_twice(database_url: str) -> None:
    queue = await PostgresQueue.open(database_url)
    try:
        await queue.add("index", 150)
        await queue.add("acte", 150)

        async def claimer(n: int) -> list[uuid.UUID]:
            taken: list[uuid.UUID] = []
            while batch := await queue.store.claim_batch(f"w{n}", ["index", "acte"], 7):
                taken += [job.id for job in batch]
            return taken

        results = await asyncio.gather(*(claimer(n) for n in range(8)))
    finally:
        await queue.close()
    claimed = [job_id for taken in results for job_id in taken]
    assert len(claimed) == 300
    assert len(set(claimed)) == 300


async def test_the_claim_reads_the_claim_index(database_url: str) -> None:
    """EXPLAIN of the claim on a queue shaped like production's: mostly done rows.

    Each type's ready rows are read in created_at order from a partial index on ready
    rows (the planner picks between the two that fit), under a LIMIT, never the table.
    """
    queue = await PostgresQueue.open(database_url)
    try:
        conn = queue.connection
        await conn.execute(
            "INSERT INTO extraction_queue (document_source, status_id, created_at)"
            " SELECT (ARRAY['index', 'acte', 'plan_cadastraux'])[1 + g % 3],"
            "        CASE WHEN g % 10 = 0 THEN 3 ELSE 5 END,"
            "        now() - random() * interval '30 days'"
            " FROM generate_series(1, 20000) AS g ORDER BY random()"
        )
        await conn.execute("ANALYZE extraction_queue")
        async with conn.transaction():
            lines = await conn.fetch(
                "EXPLAIN " + QUERIES["claim_batch"], "w1", ["index", "acte"], 8, uuid.uuid4()
            )
    finally:
        await queue.close()
    text = "\n".join(line[0] for line in lines)
    scan = re.search(r"LockRows.*\n\s*->  Index Scan using (\w+) on extraction_queue", text)
    assert scan is not None, text
    assert scan[1] in {"idx_extraction_queue_ocr_claim", "idx_extraction_queue_ready"}
    assert text.index("Limit") < text.index("LockRows"), "the scan must stop after the batch"
    assert "Seq Scan on extraction_queue" not in text, text


async def test_a_claim_lost_with_its_connection_is_released_before_the_next(
    database_url: str,
) -> None:
    queue = await PostgresQueue.open(database_url)
    try:
        (row_id,) = await queue.add("acte")
        lost = uuid.uuid4()
        # What a claim that committed while its answer was lost leaves behind.
        await queue.connection.execute(QUERIES["claim_batch"], "w1", ["acte"], 1, lost)
        assert (await queue.row(row_id))["status_id"] == 6
        queue.store._uncertain_claims.append(lost)

        (job,) = await queue.store.claim_batch("w1", ["acte"], 1)
        assert job.id == row_id
        assert job.attempts == 1, "the lost claim must not count as an attempt"
    finally:
        await queue.close()


@pytest.mark.parametrize(("cache_size", "prepared"), [(100, True), (0, False)])
async def test_statement_cache_can_be_disabled_for_transaction_poolers(
    database_url: str, cache_size: int, prepared: bool
) -> None:
    store = await PostgresJobStore.connect(
        database_url, statement_cache_size=cache_size, max_connections=1
    )
    try:
        await store.claim_batch("w1", ["acte"], 1)
        await store.queue_depth()
        async with store._pool.acquire() as connection:
            named = await connection.fetchval("SELECT count(*) FROM pg_prepared_statements")
    finally:
        await store.close()
    assert (named > 0) is prepared


async def test_rows_claimed_by_another_system_are_left_to_it(database_url: str) -> None:
    """The original worker claims without a claim id or a lease: its sweep owns those rows."""
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO extraction_queue (document_source, status_id, ocr_worker_id,"
            " ocr_started_at, ocr_attempts) VALUES"
            " ('acte', 6, 'legacy-worker-1', now() - interval '5 minutes', 1),"
            " ('acte', 6, 'legacy-worker-2', now() - interval '2 hours', 1)"
        )
        store = await PostgresJobStore.connect(database_url)
        try:
            recovery = await store.recover(grace_s=1.0)
        finally:
            await store.close()
        statuses = await connection.fetch(
            "SELECT ocr_worker_id, status_id FROM extraction_queue ORDER BY ocr_worker_id"
        )
    finally:
        await connection.close()
    assert recovery is not None
    assert recovery.requeued == 1
    assert [(r["ocr_worker_id"], r["status_id"]) for r in statuses] == [
        ("legacy-worker-1", 6),
        ("legacy-worker-2", 3),
    ]
