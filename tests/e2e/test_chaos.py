"""A fleet of three worker processes under trouble: real Postgres, real Redis, and the
Gemini emulator holding the fleet to a strict rolling quota (the fleet's budget divided
by its safety factor). Each test checks that every document ends where it should, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest
from fleet import Fleet, FleetConfig, poison_documents, sample_documents

from runtime.limiter.registry import HEARTBEAT_S
from runtime.services import LocalPostgres, LocalRedis

pytestmark = pytest.mark.slow


def _summary(fleet: Fleet) -> str:
    stats = fleet.stats()
    return (
        f"calls {stats['requests']}, 429s {stats['http_429']}, "
        f"peak {stats['peak_counted_requests']}/{fleet.config.rpm_budget} requests and "
        f"{stats['peak_tokens']}/{fleet.config.tpm_budget} tokens in a window; "
        f"{fleet.describe_workers()}"
    )


def _assert_done_once(fleet: Fleet, rows: Sequence[asyncpg.Record]) -> None:
    not_done = [(r["document_number"], r["status_id"], r["ocr_error"]) for r in rows
                if r["status_id"] != 5]  # fmt: skip
    assert not not_done, f"rows not done: {not_done}; {_summary(fleet)}"
    assert all(r["file_content"] for r in rows), "a row in 5 has no file_content"
    completions = fleet.completions()
    twice = {job: n for job, n in completions.items() if n > 1}
    assert not twice, f"rows completed more than once: {twice}"
    missing = [r["document_number"] for r in rows if completions[str(r["id"])] != 1]
    assert not missing, f"rows in 5 without exactly one completion logged: {missing}"


async def test_baseline_every_row_done_once_within_the_quota(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    documents = sample_documents(index=18, actes=18)
    async with Fleet(database_url, redis_url, tmp_path, documents) as fleet:
        rows = await fleet.wait_all_final(timeout_s=90)
        _assert_done_once(fleet, rows)
        attempts = {r["document_number"]: r["ocr_attempts"] for r in rows if r["ocr_attempts"] != 1}
        assert not attempts, f"rows claimed more than once: {attempts}"
        owners = {r["ocr_worker_id"] for r in rows}
        assert len(owners) == 3, f"every worker should have taken rows, got {owners}"
        stats = fleet.stats()
        assert stats["http_429"] == 0, _summary(fleet)
        assert fleet.files_stored() == 0, "files left at the emulator"
        utilisation = fleet.utilisation()
        assert utilisation >= 0.9, f"busiest window used {utilisation:.1%}; {_summary(fleet)}"
        assert utilisation <= 1.0, f"busiest window used {utilisation:.1%}; {_summary(fleet)}"
        print(f"baseline: {utilisation:.1%} of the budget in the busiest window; "
              f"{_summary(fleet)}")  # fmt: skip


async def test_poison_documents_fail_with_a_readable_error(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    poison = poison_documents()
    documents = sample_documents(index=6, actes=6) + poison
    async with Fleet(database_url, redis_url, tmp_path, documents) as fleet:
        rows = await fleet.wait_all_final(timeout_s=90)
        by_number = {r["document_number"]: r for r in rows}
        errors = {d.name: by_number[d.number]["ocr_error"] for d in poison}
        statuses = {d.name: by_number[d.number]["status_id"] for d in poison}
        assert set(statuses.values()) == {4}, f"poison documents: {statuses} {errors}"
        expected = {
            "9000001-corrupt.pdf": "damaged",
            "99000002-encrypted.pdf": "encrypted",
            "9000003-empty.pdf": "no pages",
            "99000004-missing.pdf": "not found",
        }
        for name, words in expected.items():
            assert words in (errors[name] or ""), f"{name}: ocr_error {errors[name]!r}"
        attempts = {d.name: by_number[d.number]["ocr_attempts"] for d in poison}
        assert set(attempts.values()) == {1}, f"poison retried: {attempts}"
        poison_numbers = {d.number for d in poison}
        healthy = [r for r in rows if r["document_number"] not in poison_numbers]
        _assert_done_once(fleet, healthy)
        assert fleet.stats()["http_429"] == 0, _summary(fleet)
        assert fleet.files_stored() == 0, "files left at the emulator"


async def test_sigkill_one_worker_its_rows_are_recovered_within_the_lease(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    lease_s = 3.0
    config = FleetConfig(lease_s=lease_s)
    documents = sample_documents(index=18, actes=18)
    async with Fleet(database_url, redis_url, tmp_path, documents, config) as fleet:
        victim = fleet.workers[0]
        await fleet.wait_until(
            lambda rows: (
                sum(r["status_id"] == 5 for r in rows) >= 6
                and any(
                    r["status_id"] == 6 and r["ocr_worker_id"] == victim.worker_id for r in rows
                )
            ),
            timeout_s=60,
            what="the victim to hold rows mid-run",
        )
        assert await fleet.kill(victim) == -9
        killed_at = time.monotonic()
        stranded = {r["id"] for r in await fleet.rows()
                    if r["status_id"] == 6 and r["ocr_worker_id"] == victim.worker_id}  # fmt: skip
        assert stranded, "the killed worker held no row"
        await fleet.wait_until(
            lambda rows: not any(r["id"] in stranded and r["status_id"] == 6
                                 and r["ocr_worker_id"] == victim.worker_id for r in rows),
            timeout_s=lease_s + 5,
            what="the killed worker's rows to be recovered",
        )  # fmt: skip
        recovered_after = time.monotonic() - killed_at
        assert recovered_after <= lease_s + 1.0, f"recovered after {recovered_after:.1f} s"
        rows = await fleet.wait_all_final(timeout_s=90)
        _assert_done_once(fleet, rows)
        for row in rows:
            if row["id"] in stranded:
                assert row["ocr_attempts"] == 2, f"recovered row: {dict(row)}"
                assert row["ocr_worker_id"] != victim.worker_id
            else:
                assert row["ocr_attempts"] == 1, f"row claimed twice: {dict(row)}"
        assert fleet.stats()["http_429"] == 0, _summary(fleet)
        print(f"sigkill: {len(stranded)} rows recovered after {recovered_after:.1f} s; "
              f"{_summary(fleet)}")  # fmt: skip


async def test_redis_outage_no_worker_dies_and_no_burst_of_429s(
    database_url: str, redis_url: str, redis_server: LocalRedis, tmp_path: Path
) -> None:
    documents = sample_documents(index=40, actes=40)
    async with Fleet(database_url, redis_url, tmp_path, documents) as fleet:
        # While Redis is away each worker takes budget / the live workers it last counted;
        # that count is refreshed by the registry heartbeat, so wait for one round of it.
        settled = await fleet.wait_started() + HEARTBEAT_S + 1.5
        await asyncio.sleep(max(0.0, settled - time.monotonic()))
        assert (await fleet.statuses())[3] > 20, "the queue ran dry before the outage"
        try:
            redis_server.stop()
            await asyncio.sleep(4)
        finally:
            redis_server.start()
        rows = await fleet.wait_all_final(timeout_s=90)
        assert all(w.alive for w in fleet.workers), fleet.describe_workers()
        _assert_done_once(fleet, rows)
        stats = fleet.stats()
        assert stats["http_429"] < 0.02 * stats["requests"], _summary(fleet)
        print(f"redis outage: {_summary(fleet)}")


async def test_postgres_restart_nothing_lost_nothing_twice(
    database_url: str, redis_url: str, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    documents = sample_documents(index=18, actes=18)
    async with Fleet(database_url, redis_url, tmp_path, documents) as fleet:
        try:
            await fleet.wait_done(8)
            pg_server.stop()
            await asyncio.sleep(2)
        finally:
            pg_server.start()
        rows = await fleet.wait_all_final(timeout_s=90)
        assert all(w.alive for w in fleet.workers), fleet.describe_workers()
        _assert_done_once(fleet, rows)
        attempts = {r["document_number"]: r["ocr_attempts"] for r in rows
                    if r["ocr_attempts"] not in (1, 2)}  # fmt: skip
        assert not attempts, f"unexpected attempts: {attempts}"
        assert fleet.stats()["http_429"] == 0, _summary(fleet)
        print(f"postgres restart: {_summary(fleet)}")


@pytest.mark.timeout(180)
async def test_quota_cut_by_half_the_fleet_adapts_within_two_windows(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    config = FleetConfig(rpm=120)
    documents = sample_documents(index=60, actes=60)
    async with Fleet(database_url, redis_url, tmp_path, documents, config) as fleet:
        await fleet.wait_done(20)
        fleet.emulator.set_quota(None, config.rpm // 2, config.tpm // 2)
        cut = fleet.stats()
        await asyncio.sleep(2 * config.limiter_window_s)
        adapted = fleet.stats()
        statuses = await fleet.statuses()
        assert statuses[3] > 0, f"the queue ran dry too early: {dict(statuses)}"
        rows = await fleet.wait_all_final(timeout_s=120)
        after = fleet.stats()
        _assert_done_once(fleet, rows)
        calls = after["requests"] - adapted["requests"]
        rejected = after["http_429"] - adapted["http_429"]
        assert calls > 100, f"too few calls after adapting: {calls}"
        figures = (f"429s: {cut['http_429']} before the cut, "
                   f"{adapted['http_429'] - cut['http_429']} while adapting, {rejected} of "
                   f"{calls} calls after two windows; {_summary(fleet)}")  # fmt: skip
        # The fleet re-learns a lowered quota by cutting on 429s, then probes back up
        # slowly (twenty windows from the knee to the level that failed), so the run
        # after adapting (about six windows) sees no probe: 0 of about 224 calls were
        # rejected in each of three runs. A probe costs a few 429s once every twenty-odd
        # windows, well under 1 % of the calls over a longer run.
        assert rejected < 0.01 * calls, figures
        print(f"quota cut: {figures}")


@pytest.mark.timeout(300)
async def test_uncertain_outputs_use_the_token_budget_without_429s(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Output sizes vary from call to call (lognormal, CV 1, three times the samples' size)
    and the quota counts total tokens: the fleet reserves expected tokens, holds one margin
    for the calls not settled yet, and still fills the token budget from a cold start."""
    config = FleetConfig(
        rpm=400,  # requests never bind: tokens do
        tpm=120_000,
        window_s=5.0,
        namespace="e2e-uncertain",
        emulator={"tpm_counts": "total", "output_scale": 3.0, "output_cv": 1.0, "seed": 13},
    )
    documents = sample_documents(index=24, actes=24)
    async with Fleet(database_url, redis_url, tmp_path, documents, config) as fleet:
        rows = await fleet.wait_all_final(timeout_s=240)
        _assert_done_once(fleet, rows)
        stats = fleet.stats()
        rejected_share = stats["http_429"] / max(1, stats["requests"])
        assert rejected_share <= 0.01, _summary(fleet)
        utilisation = float(stats["peak_tokens"]) / config.tpm_budget
        assert utilisation >= 0.8, f"busiest window used {utilisation:.1%}; {_summary(fleet)}"
