"""Redis killed and restarted under load: callers never see an error, the budget holds."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from runtime.limiter import Budget, create_limiter
from runtime.limiter.registry import RedisWorkerRegistry
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


@pytest.mark.slow
async def test_redis_killed_and_restarted(redis_server: LocalRedis, redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    await RedisWorkerRegistry(client, "outage").register("other-worker", "index")
    await client.aclose()
    limiter = await create_limiter(
        redis_url, BUDGET, namespace="outage", worker_id="me", worker_type="acte", timeout_s=0.5
    )
    assert limiter.live_workers_seen == 2
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
        await asyncio.sleep(1.0)
        redis_server.kill()
        killed_at = time.time()
        await asyncio.sleep(2.0)
        assert limiter.degraded
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
    # Alone, this process admits at most its share: budget / live workers last seen.
    assert max_in_window(during, W) <= BUDGET.rpm // 2
    after = [t for t in shared if t > killed_at]
    assert after, "admissions resumed on Redis"
    assert max_in_window(after, W) <= BUDGET.rpm  # the restart granted no fresh burst
    print(
        f"\nfallback admissions {len(during)} (max {max_in_window(during, W)}/window, "
        f"share {BUDGET.rpm // 2}); after restart max {max_in_window(after, W)}/window"
    )
    await limiter.aclose()
