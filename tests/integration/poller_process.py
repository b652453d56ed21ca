"""One poller process over a test database, for the multi-process tests.

Usage: ``python poller_process.py DSN WORKER_ID MODE [CONCURRENCY] [LEASE_S]``. The handler
records each start and finish in the side table ``poller_events``; MODE says how long a
job takes: ``quick`` (a few ms), ``hang`` (forever) or ``slow`` (4 s for documents
numbered "slow", a moment for the others). SIGTERM stops the poller gracefully.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys

import asyncpg

from runtime.poller import Job, JobResult, Poller, PostgresJobStore

EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS poller_events (
    job_id    uuid NOT NULL,
    worker_id text NOT NULL,
    event     text NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def main(dsn: str, worker_id: str, mode: str, concurrency: int, lease_s: float) -> None:
    store = await PostgresJobStore.connect(dsn)
    events = await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency)

    async def record(job: Job, event: str) -> None:
        await events.execute(
            "INSERT INTO poller_events (job_id, worker_id, event) VALUES ($1, $2, $3)",
            job.id,
            worker_id,
            event,
        )

    async def handler(job: Job) -> JobResult:
        await record(job, "start")
        if mode == "hang":
            await asyncio.sleep(3600)
        elif mode == "slow" and job.document_number == "slow":
            await asyncio.sleep(4.0)
        else:
            await asyncio.sleep(random.uniform(0, 0.01))
        await record(job, "finish")
        return JobResult(file_content=f"raw {job.id}", boosted_file_content="boosted")

    poller = Poller(
        store,
        handler,
        worker_id=worker_id,
        worker_types=["index", "acte"],
        concurrency=concurrency,
        lease_s=lease_s,
        poll_interval_s=0.1,
        drain_s=5.0,
        backoff_base_s=0.2,
        backoff_max_s=1.0,
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, poller.stop)
    try:
        await poller.run()
    finally:
        await events.close()
        await store.close()


if __name__ == "__main__":
    dsn, worker, run_mode = sys.argv[1:4]
    slots = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    lease = float(sys.argv[5]) if len(sys.argv) > 5 else 2.0
    asyncio.run(main(dsn, worker, run_mode, slots, lease))
