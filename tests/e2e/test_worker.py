"""Real worker processes through their whole life cycle: claims, results, SIGTERM with a
drain or hand-back, the worker registry, the Prometheus endpoint and the monitor, all
checked against what the Gemini emulator itself counted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fleet import Fleet, FleetConfig, sample_documents

pytestmark = pytest.mark.slow


async def test_sigterm_drains_or_hands_back_and_the_registry_forgets_the_worker(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    drain_s = 2.0
    config = FleetConfig(drain_s=drain_s)
    documents = sample_documents(index=18, actes=18)
    async with Fleet(database_url, redis_url, tmp_path, documents, config) as fleet:
        ids = {w.worker_id for w in fleet.workers}
        await fleet.wait_started()
        victim = fleet.workers[0]
        async with fleet.observer() as observer:
            live = await observer.live_workers()
            assert set(live.get("index", [])) == ids, live
            assert set(live.get("acte", [])) == ids, live
            await fleet.wait_until(
                lambda rows: any(r["status_id"] == 6 and r["ocr_worker_id"] == victim.worker_id
                                 for r in rows),
                timeout_s=30,
                what="the worker to hold a row",
            )  # fmt: skip
            code, took = await fleet.terminate(victim, timeout_s=drain_s + 10)
            assert code == 0, f"exit {code} after {took:.1f} s; {fleet.describe_workers()}"
            assert took <= drain_s + 3, f"the worker took {took:.1f} s to stop"
            left = await observer.live_workers()
            assert victim.worker_id not in {w for ws in left.values() for w in ws}, left
            assert set(left.get("index", [])) == ids - {victim.worker_id}, left

        rows = await fleet.rows()
        held = [r["document_number"] for r in rows
                if r["status_id"] == 6 and r["ocr_worker_id"] == victim.worker_id]  # fmt: skip
        assert not held, f"rows left in OCR by the stopped worker: {held}"
        events = victim.events()
        started = {e["job_id"] for e in events if e.get("event") == "job started"}
        completed = {e["job_id"] for e in events if e.get("event") == "job done"}
        handed = {e["job_id"] for e in events if e.get("event") == "job handed back"}
        assert started, "the worker ran no job"
        assert started == completed | handed, (
            f"jobs neither finished nor handed back: {started - completed - handed}"
        )
        assert any(e.get("event") == "worker stopped" for e in events)

        rows = await fleet.wait_all_final(timeout_s=90)
        not_done = [r["document_number"] for r in rows if r["status_id"] != 5]
        assert not not_done, f"rows not done: {not_done}"
        attempts = {r["document_number"]: r["ocr_attempts"] for r in rows if r["ocr_attempts"] != 1}
        assert not attempts, f"a hand-back counted an attempt: {attempts}"
        by_id = {str(r["id"]): r for r in rows}
        for job in handed:
            assert by_id[job]["ocr_worker_id"] != victim.worker_id, "handed back, yet its own"
        for job in completed:
            assert by_id[job]["ocr_worker_id"] == victim.worker_id
        twice = {job: n for job, n in fleet.completions().items() if n > 1}
        assert not twice, f"rows completed twice: {twice}"
        assert fleet.stats()["http_429"] == 0
        print(f"sigterm: stopped in {took:.1f} s, {len(completed)} jobs finished while "
              f"draining or before, {len(handed)} handed back")  # fmt: skip


def _sum(samples: dict[str, float], prefix: str, *labels: str) -> float:
    return sum(v for k, v in samples.items()
               if k.startswith(prefix) and all(label in k for label in labels))  # fmt: skip


@pytest.mark.timeout(150)
async def test_metrics_and_monitor_match_the_emulator(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    documents = sample_documents(index=24, actes=24)
    config = FleetConfig()
    async with Fleet(database_url, redis_url, tmp_path, documents, config,
                     start_workers=False) as fleet:  # fmt: skip
        workers = [await fleet.start_worker(n, metrics=True) for n in range(3)]
        await fleet.wait_started()
        # Saturated for more than one window: the window is full of the fleet's calls.
        await asyncio.sleep(config.limiter_window_s + 1)
        assert (await fleet.statuses())[3] > 0, "the queue ran dry too early"
        code, snapshot, err = await fleet.monitor(MONITOR_ALERT_AT="0.5")
        assert snapshot is not None, f"monitor printed no JSON (exit {code}): {err}"
        assert code == 2, f"monitor exit {code} with usage above the alert level: {snapshot}"
        (view,) = [m for m in snapshot["models"] if m["model"] == config.model]
        assert view["rpm_budget"] == config.rpm_budget
        assert view["rpm_share"] >= 0.5
        assert any("RPM" in alert for alert in snapshot["alerts"]), snapshot["alerts"]
        assert set(snapshot["workers"]["acte"]) == {w.worker_id for w in workers}

        rows = await fleet.wait_all_final(timeout_s=90)
        assert all(r["status_id"] == 5 for r in rows)
        stats = fleet.stats()
        assert stats["http_429"] == 0
        scraped = {w.worker_id: await fleet.scrape(w) for w in workers}
        admissions = 0.0
        for worker in workers:
            samples = scraped[worker.worker_id]
            owned = sum(r["ocr_worker_id"] == worker.worker_id for r in rows)
            done = _sum(samples, "ocr_jobs_total", 'outcome="done"')
            assert done == owned, f"{worker.worker_id}: ocr_jobs_total {done}, rows {owned}"
            calls = sum(e["calls"] for e in worker.events()
                        if e.get("event") == "job done" and "calls" in e)  # fmt: skip
            admitted = samples["gemini_admissions_total"]
            assert admitted == calls, f"{worker.worker_id}: {admitted} admissions, {calls} calls"
            assert samples["gemini_rate_limited_total"] == 0
            admissions += admitted
        assert admissions == stats["requests"] == stats["admitted"], (
            f"admissions {admissions}, emulator {stats['requests']}"
        )

        # Once the window is quiet again, no alert and exit 0.
        await asyncio.sleep(config.limiter_window_s + 0.5)
        code, snapshot, err = await fleet.monitor(MONITOR_ALERT_AT="0.5")
        assert code == 0, f"monitor exit {code}: {snapshot or err}"
        assert snapshot is not None
        assert not snapshot["alerts"], snapshot["alerts"]
        print(f"metrics: {admissions:.0f} admissions, emulator {stats['requests']} calls")


async def test_monitor_usage_matches_the_emulator(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    documents = sample_documents(index=24, actes=24)
    config = FleetConfig()
    async with Fleet(database_url, redis_url, tmp_path, documents, config) as fleet:
        await fleet.wait_started()
        await asyncio.sleep(config.limiter_window_s + 1)
        assert (await fleet.statuses())[3] > 0, "the queue ran dry too early"
        # The monitor counts over the limiter's window (the quota window plus the arrival
        # skew), the emulator over the quota window alone: scale the emulator's count.
        scale = config.limiter_window_s / config.window_s
        readings = []
        before = fleet.window_usage()[0]
        code, snapshot, err = await fleet.monitor()
        after = fleet.window_usage()[0]
        assert snapshot is not None, f"monitor printed no JSON (exit {code}): {err}"
        (view,) = [m for m in snapshot["models"] if m["model"] == config.model]
        readings.append((view["requests"], (before + after) / 2 * scale))
        async with fleet.observer() as observer:
            for _ in range(4):
                before = fleet.window_usage()[0]
                usage = await observer.usage(model=config.model)
                after = fleet.window_usage()[0]
                readings.append((usage.requests, (before + after) / 2 * scale))
                await asyncio.sleep(0.3)
        for reported, emulated in readings:
            assert reported <= config.rpm_budget, f"(monitor, emulator): {readings}"
            assert abs(reported - emulated) <= 0.05 * emulated + 1, f"{readings}"
