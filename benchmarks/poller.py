"""Claims per second of the poller against the bare SQL it is built on.

Four processes drain a queue of ready rows with a no-op pipeline through ``Poller``; four
processes drain the same queue with the bare claim-and-complete statements in a raw
asyncpg loop, the limit of this design. Run alone with ``python -m benchmarks.poller``
(an embedded Postgres is started unless ``DATABASE_URL`` is set).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event

import asyncpg

from runtime.db import init_schema
from runtime.poller import Job, JobResult, Poller, PostgresJobStore
from runtime.services import local_services

PROCESSES = 4
CONCURRENCY = 8
TYPES = ["index", "acte"]
_DATABASE = "bench_poller"

_RAW_CLAIM = """
UPDATE extraction_queue
SET status_id = 6, ocr_worker_id = $1, ocr_started_at = now(),
    ocr_attempts = ocr_attempts + 1, ocr_claim_id = $2, updated_at = now()
WHERE id IN (
    SELECT id FROM extraction_queue
    WHERE status_id = 3 AND document_source = ANY($3::text[])
    ORDER BY created_at LIMIT $4
    FOR UPDATE SKIP LOCKED)
RETURNING id
"""
_RAW_COMPLETE = """
UPDATE extraction_queue
SET status_id = 5, file_content = $3, boosted_file_content = $4, ocr_completed_at = now(),
    ocr_error = NULL, updated_at = now()
WHERE id = $1 AND status_id = 6 AND ocr_claim_id = $2
"""


async def _raw_loop(dsn: str, worker_id: str, ready: Event, go: Event, stop: Event) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=CONCURRENCY, max_size=CONCURRENCY)
    ready.set()
    await asyncio.to_thread(go.wait)
    try:
        while not stop.is_set():
            claim = uuid.uuid4()
            rows = await pool.fetch(_RAW_CLAIM, worker_id, claim, TYPES, CONCURRENCY)
            if not rows:
                await asyncio.sleep(0.01)
                continue
            await asyncio.gather(
                *(pool.execute(_RAW_COMPLETE, row["id"], claim, "", "") for row in rows)
            )
    finally:
        await pool.close()


async def _poller_loop(dsn: str, worker_id: str, ready: Event, go: Event, stop: Event) -> None:
    store = await PostgresJobStore.connect(dsn, max_connections=CONCURRENCY + 2)

    async def no_op(job: Job) -> JobResult:
        return JobResult(file_content="", boosted_file_content="")

    poller = Poller(
        store,
        no_op,
        worker_id=worker_id,
        worker_types=TYPES,
        concurrency=CONCURRENCY,
        lease_s=30.0,
        poll_interval_s=0.01,
        drain_s=5.0,
    )
    ready.set()
    await asyncio.to_thread(go.wait)

    async def watch_stop() -> None:
        await asyncio.to_thread(stop.wait)
        poller.stop()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(watch_stop())
            group.create_task(poller.run())
    finally:
        await store.close()


_LOOPS: dict[str, Callable[[str, str, Event, Event, Event], object]] = {
    "raw": _raw_loop,
    "poller": _poller_loop,
}


def _child(kind: str, dsn: str, worker_id: str, ready: Event, go: Event, stop: Event) -> None:
    import logging

    import structlog

    # Per-job log lines would measure the terminal, not the queue.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(_LOOPS[kind](dsn, worker_id, ready, go, stop))  # type: ignore[arg-type]


async def _fresh_queue(admin_dsn: str, dsn: str, rows: int) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {_DATABASE}")
    finally:
        await admin.close()
    await init_schema(dsn)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "INSERT INTO extraction_queue (document_source, status_id, created_at)"
            " SELECT (ARRAY['index', 'acte'])[1 + g % 2], 3, now() - g * interval '1 ms'"
            " FROM generate_series(1, $1) AS g",
            rows,
        )
        await connection.execute("VACUUM ANALYZE extraction_queue")
    finally:
        await connection.close()


async def _count_done(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM extraction_queue WHERE status_id = 5")
        )
    finally:
        await connection.close()


def _one_run(kind: str, admin_dsn: str, dsn: str, rows: int) -> float:
    """Claims per second of one run: all rows done, from the start signal to the last."""
    asyncio.run(_fresh_queue(admin_dsn, dsn, rows))
    context = multiprocessing.get_context("spawn")
    go, stop = context.Event(), context.Event()
    readies = [context.Event() for _ in range(PROCESSES)]
    processes = [
        context.Process(target=_child, args=(kind, dsn, f"{kind}-{n}", readies[n], go, stop))
        for n in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a benchmark process did not start")
        started = time.perf_counter()
        go.set()
        while asyncio.run(_count_done(dsn)) < rows:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return rows / elapsed


def run(quick: bool = False) -> str:
    """Measure both loops and return the Markdown section for docs/benchmarks.md."""
    rows, runs = (2000, 2) if quick else (10000, 3)
    with local_services(None, os.environ.get("DATABASE_URL"), with_redis=False) as urls:
        admin_dsn = urls.database_url
        dsn = admin_dsn.rsplit("/", 1)[0] + f"/{_DATABASE}"
        results: dict[str, list[float]] = {"raw": [], "poller": []}
        for _ in range(runs):
            for kind in ("raw", "poller"):
                results[kind].append(_one_run(kind, admin_dsn, dsn, rows))
        asyncio.run(_drop_queue(admin_dsn))
    raw = statistics.median(results["raw"])
    poller = statistics.median(results["poller"])
    ratio = poller / raw
    verdict = "meets" if ratio >= 0.8 else "misses"
    return "\n".join(
        [
            "## Poller: claims per second",
            "",
            f"{PROCESSES} processes, {CONCURRENCY} slots each, no-op pipeline, {rows} ready rows"
            f" (index and acte), median of {runs} runs, cpus={os.cpu_count()}.",
            "",
            "| loop | claims/s (median) | runs |",
            "|---|---:|---|",
            f"| raw asyncpg claim + complete | {raw:,.0f} | "
            + ", ".join(f"{v:,.0f}" for v in results["raw"])
            + " |",
            f"| Poller (fenced, leased, fair) | {poller:,.0f} | "
            + ", ".join(f"{v:,.0f}" for v in results["poller"])
            + " |",
            "",
            f"Ratio poller / raw: **{ratio:.2f}** ({verdict} the 0.8 target).",
            "",
        ]
    )


async def _drop_queue(admin_dsn: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_DATABASE} WITH (FORCE)")
    finally:
        await admin.close()


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv or os.environ.get("BENCH_QUICK") == "1"))
