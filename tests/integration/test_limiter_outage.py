"""Redis killed and restarted under load: callers never see an error, the budget holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

from runtime.limiter import Budget, Limiter, MemoryRateStore, create_limiter
from runtime.limiter.budget import Decision, Limits, Snapshot
from runtime.limiter.errors import StoreUnavailable
from runtime.limiter.registry import LiveCounts, MemoryWorkerRegistry, RedisWorkerRegistry
from runtime.services import LocalRedis

W = 0.5
BUDGET = Budget(rpm=40, tpm=100_000, window_s=W)


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


class SwitchableStore:
    """A shared store that can be switched off: every call then fails as Redis would."""

    def __init__(self) -> None:
        self.inner = MemoryRateStore()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off")

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]:
        self._check()
        return await self.inner.admit_many(model, limits, requests, lane)

    async def settle(
        self, model: str, limits: Limits, grant_id: str, estimate: int, actual: int, lane: str
    ) -> int:
        self._check()
        return await self.inner.settle(model, limits, grant_id, estimate, actual, lane)

    async def release(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> bool:
        self._check()
        return await self.inner.release(model, limits, grant_id, tokens, lane)

    async def report(self, model: str, limits: Limits, retry_after_us: int, teach: bool) -> None:
        self._check()
        await self.inner.report(model, limits, retry_after_us, teach)

    async def snapshot(self, model: str, limits: Limits) -> Snapshot:
        self._check()
        return await self.inner.snapshot(model, limits)

    async def ping(self) -> None:
        self._check()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_live_counts_keep_the_largest_of_the_last_30_s() -> None:
    counts = LiveCounts()
    assert (counts.latest, counts.largest) == (1, 1)
    counts.add(100.0, 1)
    counts.add(101.0, 4)
    counts.add(102.0, 2)
    assert (counts.latest, counts.largest) == (2, 4)
    counts.add(130.5, 2)  # the reading of 4 is 29.5 s old: still remembered
    assert counts.largest == 4
    counts.add(131.5, 0)  # now 30.5 s old: forgotten; a count is never below 1
    assert (counts.latest, counts.largest) == (1, 2)


async def test_a_fleet_that_just_started_divides_the_fallback_by_its_size() -> None:
    budget = Budget(rpm=90, tpm=90_000, window_s=1.0)
    store = SwitchableStore()
    registry = MemoryWorkerRegistry()
    limiter = Limiter(budget, store=store, registry=registry, live_refresh_s=0.02)
    await limiter.start()
    await limiter.register("first", "acte")
    assert limiter.live_workers_seen == 1
    # Two more workers start; the shared store fails before the next heartbeat (10 s).
    await registry.register("second", "acte")
    await registry.register("third", "index")
    await asyncio.sleep(0.2)
    assert limiter.live_workers_seen == 3
    await registry.deregister("third")  # one leaves just before the outage
    await asyncio.sleep(0.2)
    assert (limiter.live_workers_seen, limiter.fallback_parts) == (2, 3)
    store.down = True
    async with limiter.acquire(10, model="flash") as grant:
        assert not grant.shared
    usage = await limiter.usage(model="flash")
    assert usage.degraded
    assert (usage.effective_rpm, usage.effective_tpm) == (30, 30_000)  # a third, not all
    await asyncio.sleep(0.1)  # no reading while the store is away: the divisor holds
    assert limiter.fallback_parts == 3
    await limiter.aclose()


@pytest.mark.slow
async def test_redis_killed_and_restarted(redis_server: LocalRedis, redis_url: str) -> None:
    limiter = await create_limiter(
        redis_url, BUDGET, namespace="outage", worker_id="me", worker_type="acte", timeout_s=0.5
    )
    assert limiter.live_workers_seen == 1
    # A second worker starts after this one and is seen long before the next heartbeat.
    client = aioredis.from_url(redis_url)
    other = RedisWorkerRegistry(client, "outage")
    await other.register("other-worker", "index")
    local: list[float] = []
    shared: list[float] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            async with limiter.acquire(100, model="flash", lane="acte") as grant:
                (shared if grant.shared else local).append(grant.slot)
                await asyncio.sleep(0.01)
                await grant.settle(80)

    callers = [asyncio.create_task(caller()) for _ in range(30)]
    try:
        await asyncio.sleep(1.5)
        assert limiter.live_workers_seen == 2
        # It stops just before Redis dies: the fallback still counts it (seen < 30 s ago).
        await other.deregister("other-worker")
        await client.aclose()
        redis_server.kill()
        killed_at = time.time()
        await asyncio.sleep(2.0)
        assert limiter.degraded
        assert limiter.fallback_parts == 2
        redis_server.start()
        for _ in range(100):  # the probe runs every 0.5 s
            if not limiter.degraded:
                break
            await asyncio.sleep(0.05)
        assert not limiter.degraded  # back on Redis by itself
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(r is None for r in results), results  # no exception reached a caller
    during = [t for t in local if t >= killed_at]
    assert limiter.stats.fallback_admissions == len(local) > 0
    # Alone, this process admits at most its share: budget / most live workers seen.
    assert max_in_window(during, W) <= BUDGET.rpm // 2
    after = [t for t in shared if t > killed_at]
    assert after, "admissions resumed on Redis"
    assert max_in_window(after, W) <= BUDGET.rpm  # the restart granted no fresh burst
    print(
        f"\nfallback admissions {len(during)} (max {max_in_window(during, W)}/window, "
        f"share {BUDGET.rpm // 2}); after restart max {max_in_window(after, W)}/window"
    )
    await limiter.aclose()
