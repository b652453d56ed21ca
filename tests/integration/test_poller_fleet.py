"""Several poller processes on one queue: exclusive claims, and a process that dies."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from poller_process import EVENTS_TABLE

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("poller_process.py")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await connection.execute(EVENTS_TABLE)
    yield connection
    await connection.close()


@contextmanager
def fleet(tmp_path: Path, dsn: str) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def start(
    processes: dict[str, subprocess.Popen[bytes]],
    tmp_path: Path,
    dsn: str,
    worker_id: str,
    mode: str,
    concurrency: int = 8,
) -> None:
    with (tmp_path / f"{worker_id}.log").open("wb") as log:
        processes[worker_id] = subprocess.Popen(
            [sys.executable, str(SCRIPT), dsn, worker_id, mode, str(concurrency), "2.0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def count(db: asyncpg.Connection, where: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM extraction_queue WHERE {where}"))


async def wait_until(db: asyncpg.Connection, where: str, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await count(db, where) != expected:
        assert time.monotonic() < deadline, f"{where}: not {expected} in {timeout_s} s"
        await asyncio.sleep(0.05)


def stop_gracefully(processes: dict[str, subprocess.Popen[bytes]]) -> list[int]:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    return [process.wait(timeout=15) for process in processes.values()]


async def test_four_processes_claim_every_row_exactly_once(
    db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    await db.execute(
        "INSERT INTO extraction_queue (document_source, status_id)"
        " SELECT CASE WHEN g % 2 = 0 THEN 'index' ELSE 'acte' END, 3"
        " FROM generate_series(1, 500) AS g"
    )
    with fleet(tmp_path, database_url) as processes:
        for n in range(4):
            start(processes, tmp_path, database_url, f"p{n}", "quick")
        await wait_until(db, "status_id = 5", 500, timeout_s=45)
        assert stop_gracefully(processes) == [0, 0, 0, 0]

    starts = await db.fetch(
        "SELECT job_id, count(*) AS n FROM poller_events WHERE event = 'start' GROUP BY job_id"
    )
    assert len(starts) == 500
    assert {row["n"] for row in starts} == {1}, "a row was claimed twice"
    assert await count(db, "ocr_attempts = 1 AND file_content = 'raw ' || id") == 500
    workers = await db.fetch("SELECT DISTINCT worker_id FROM poller_events")
    assert len(workers) == 4, "every process should have taken part"
    assert await db.fetchval("SELECT count(*) FROM ocr_worker_leases") == 0


async def test_a_killed_process_loses_its_rows_within_the_lease(
    db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    insert = (
        "INSERT INTO extraction_queue (document_source, status_id, document_number)"
        " SELECT 'acte', 3, $1 FROM generate_series(1, 3)"
    )
    with fleet(tmp_path, database_url) as processes:
        await db.execute(insert, "doomed")
        start(processes, tmp_path, database_url, "doomed", "hang", concurrency=3)
        await wait_until(db, "status_id = 6 AND ocr_worker_id = 'doomed'", 3, timeout_s=15)
        await db.execute(insert, "slow")
        start(processes, tmp_path, database_url, "healthy", "slow", concurrency=6)
        await wait_until(db, "status_id = 6 AND ocr_worker_id = 'healthy'", 3, timeout_s=15)

        processes["doomed"].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_until(db, "status_id = 6 AND ocr_worker_id = 'doomed'", 0, timeout_s=5)
        lost_after_s = time.monotonic() - killed_at
        await wait_until(db, "status_id = 5", 6, timeout_s=15)
        stop_gracefully({"healthy": processes["healthy"]})

    assert lost_after_s <= 2.0 + 0.5, f"rows were recovered {lost_after_s:.1f} s after the kill"
    finished = await db.fetch(
        "SELECT job_id, count(*) AS n FROM poller_events WHERE event = 'finish' GROUP BY job_id"
    )
    assert len(finished) == 6
    assert {row["n"] for row in finished} == {1}, "a row was done twice"
    # The slow jobs (4 s, twice the lease) stayed with the healthy process.
    assert await count(db, "document_number = 'slow' AND ocr_attempts = 1") == 3
    assert await count(db, "document_number = 'doomed' AND ocr_attempts = 2") == 3
    assert await count(db, "ocr_worker_id = 'healthy'") == 6
