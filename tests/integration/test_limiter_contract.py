"""The limiter's contract, run against the Redis backend and the in-process twin alike."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from runtime.limiter import (
    Budget,
    DailyQuotaExhausted,
    LaneUsage,
    Limiter,
    RequestTooLarge,
    create_limiter,
)
from runtime.limiter.registry import MemoryWorkerRegistry, RedisWorkerRegistry

MakeLimiter = Callable[..., Awaitable[Limiter]]
# Booking a whole window ahead: these tests hold waiters behind far bookings.
BUDGET = Budget(rpm=50, tpm=20_000, window_s=1.0, booking_horizon_s=1.0)


@pytest.fixture(params=["redis", "memory"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """A flushed Redis for the Redis backend; None for the in-process one."""
    return request.getfixturevalue("redis_url") if request.param == "redis" else None  # type: ignore[no-any-return]


@pytest.fixture
async def make_limiter(backend_url: str | None) -> AsyncIterator[MakeLimiter]:
    url = backend_url
    made: list[Limiter] = []

    async def make(budget: Budget = BUDGET, **options: Any) -> Limiter:
        limiter = await create_limiter(url, budget, namespace="contract", **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


async def test_acquire_settle_and_usage(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    async with limiter.acquire(300, model="flash", lane="acte") as grant:
        assert grant.wait_s >= 0
        assert limiter.inflight == 1
        usage = await limiter.usage(model="flash")
        assert usage.lanes["acte"].requests == 1
        assert usage.lanes["acte"].tokens == 300
        await grant.settle(120)
        await grant.settle(999)  # a second settle does nothing
    usage = await limiter.usage(model="flash")
    assert usage.lanes["acte"].tokens == 120
    assert usage.budget == BUDGET
    assert (usage.effective_rpm, usage.effective_tpm) == (50, 20_000)
    assert limiter.inflight == 0
    assert limiter.stats.admissions == 1
    assert limiter.stats.tokens_reserved == 300
    assert limiter.stats.tokens_settled == 120


async def test_usage_reports_slots_booked_ahead_apart(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(Budget(rpm=10, tpm=20_000, window_s=1.0, booking_horizon_s=1.0))
    lanes = ["a", "b", "c", "d"]

    async def call(lane: str) -> None:
        async with limiter.acquire(100, model="flash", lane=lane):
            pass

    # One queue per lane: four heads book paced slots at once, all ahead of now (the
    # start-up phantom fills the past window).
    calls = [asyncio.create_task(call(lane)) for lane in lanes]
    await asyncio.sleep(0.02)
    usage = await limiter.usage(model="flash")
    assert (usage.booked_requests, usage.booked_tokens) == (4, 400)
    assert usage.requests <= 10  # the window ending now, never above the budget
    assert all(usage.lanes.get(lane, LaneUsage(0, 0, None)).requests == 0 for lane in lanes)
    await asyncio.gather(*calls)
    usage = await limiter.usage(model="flash")
    assert (usage.booked_requests, usage.booked_tokens) == (0, 0)
    assert usage.requests <= 10
    assert {lane: usage.lanes[lane].tokens for lane in lanes} == dict.fromkeys(lanes, 100)


async def test_unsettled_grant_keeps_its_estimate_and_release_refunds(
    make_limiter: MakeLimiter,
) -> None:
    limiter = await make_limiter()
    async with limiter.acquire(200, model="flash", lane="acte"):
        pass
    async with limiter.acquire(500, model="flash", lane="acte") as grant:
        await grant.release()
        await grant.settle(10)  # released: nothing left to settle
    usage = await limiter.usage(model="flash")
    assert (usage.lanes["acte"].requests, usage.lanes["acte"].tokens) == (1, 200)


async def test_request_larger_than_the_budget_fails_at_once(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    with pytest.raises(RequestTooLarge, match="20001 tokens exceeds the whole budget of 20000"):
        async with limiter.acquire(20_001, model="flash"):
            pass
    assert limiter.inflight == 0


async def test_admissions_are_paced(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(Budget(rpm=20, tpm=20_000, window_s=1.0))
    slots = []
    for _ in range(6):
        async with limiter.acquire(1, model="flash") as grant:
            slots.append(grant.slot)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= 0.05 - 1e-6  # W / rpm apart, never a burst


async def test_rate_limited_pauses_and_a_quota_429_teaches(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter()
    await limiter.report_rate_limited(model="flash", retry_after_s=0.3)
    usage = await limiter.usage(model="flash")
    assert usage.paused_until is not None
    assert 0.2 < usage.paused_for_s <= 0.3
    assert usage.factor == 1.0
    async with limiter.acquire(1, model="flash") as grant:
        assert grant.wait_s >= 0.25
    await limiter.report_rate_limited(model="flash", retry_after_s=0.0, quota_id="tpm")
    usage = await limiter.usage(model="flash")
    # 70 % of the level met: the factor, or the window's use if less (49 % at least).
    assert 0.48 <= usage.factor <= 0.71
    assert usage.effective_tpm < 20_000
    assert limiter.stats.rate_limited_reports == 2
    assert limiter.stats.quota_reports == 1


async def test_model_budgets_and_the_shared_default(make_limiter: MakeLimiter) -> None:
    pro = Budget(rpm=5, tpm=1_000, window_s=1.0)
    limiter = await make_limiter(model_budgets={"pro": pro})
    async with limiter.acquire(10, model="flash", lane="a"):
        pass
    async with limiter.acquire(20, model="lite", lane="a"):
        pass
    shared = await limiter.usage(model="lite")
    assert shared.lanes["a"].tokens == 30  # models without a budget share the default
    assert shared.budget == BUDGET
    own = await limiter.usage(model="pro")
    assert own.budget == pro
    assert own.lanes == {}
    with pytest.raises(RequestTooLarge):
        async with limiter.acquire(1_001, model="pro"):
            pass


async def test_daily_budget_raises_a_transient_error(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(rpd=2)
    for _ in range(2):
        async with limiter.acquire(1, model="flash"):
            pass
    with pytest.raises(DailyQuotaExhausted) as caught:
        async with limiter.acquire(1, model="flash"):
            pass
    assert 0 < (caught.value.retry_after_s or 0) <= 86_400
    assert (await limiter.usage(model="flash")).requests_today == 2
    assert limiter.inflight == 0


async def test_the_day_count_outlives_an_idle_spell(make_limiter: MakeLimiter) -> None:
    """Idle for longer than the window state lives, the day's requests still count."""
    limiter = await make_limiter(Budget(rpm=50, tpm=20_000, window_s=0.1), rpd=2)
    for _ in range(2):
        async with limiter.acquire(1, model="flash"):
            pass
    await asyncio.sleep(0.6)  # three windows and more: the window's own state is long stale
    with pytest.raises(DailyQuotaExhausted):
        async with limiter.acquire(1, model="flash"):
            pass
    assert (await limiter.usage(model="flash")).requests_today == 2


async def test_semaphore_bounds_calls_in_flight(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(max_inflight=2)
    peak = 0

    async def call() -> None:
        nonlocal peak
        async with limiter.acquire(1, model="flash"):
            peak = max(peak, limiter.inflight)
            await asyncio.sleep(0.03)

    await asyncio.gather(*(call() for _ in range(6)))
    assert peak == 2
    assert limiter.inflight == 0


async def test_a_lane_with_a_share_gets_through_a_saturated_lane(
    make_limiter: MakeLimiter,
) -> None:
    limiter = await make_limiter(
        Budget(rpm=20, tpm=20_000, window_s=0.5), lane_shares={"index": 0.3, "acte": 0.7}
    )

    async def acte() -> None:
        async with limiter.acquire(1, model="flash", lane="acte"):
            pass

    crowd = [asyncio.create_task(acte()) for _ in range(60)]
    await asyncio.sleep(0.6)  # acte saturates the budget, the start-up phantom is gone
    async with limiter.acquire(1, model="flash", lane="index") as grant:
        assert grant.wait_s < 0.15  # a few paced steps, not behind the 60 acte waiters
    for task in crowd:
        task.cancel()
    await asyncio.gather(*crowd, return_exceptions=True)
    usage = await limiter.usage(model="flash")
    assert usage.lanes["index"].requests == 1
    assert usage.lanes["index"].share == 0.3
    assert usage.lanes["acte"].requests <= 20
    assert limiter.inflight == 0


async def test_worker_registry(make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(worker_id="w1", worker_type="acte", heartbeat_s=0.05)
    await asyncio.sleep(0.12)
    assert limiter.live_workers_seen == 1
    await limiter.register("w2", ["index", "acte"])
    assert await limiter.live_workers() == {"acte": ["w1", "w2"], "index": ["w2"]}
    assert limiter.live_workers_seen == 2  # one worker of two types counts once
    await limiter.deregister("w2")
    assert await limiter.live_workers() == {"acte": ["w1"]}


async def test_live_count_is_read_often_and_remembered(
    make_limiter: MakeLimiter, backend_url: str | None
) -> None:
    limiter = await make_limiter(worker_id="w1", worker_type="acte", live_refresh_s=0.05)
    assert (limiter.live_workers_seen, limiter.fallback_parts) == (1, 1)
    client = None
    if backend_url is None:
        registry: Any = limiter._registry  # the in-process registry of this limiter
    else:
        import redis.asyncio as aioredis

        client = aioredis.from_url(backend_url)
        registry = RedisWorkerRegistry(client, "contract")
    # The rest of the fleet starts: seen well before the next heartbeat (10 s).
    await registry.register("w2", "index")
    await registry.register("w3", ["index", "acte"])
    await asyncio.sleep(0.3)
    assert (limiter.live_workers_seen, limiter.fallback_parts) == (3, 3)
    # They leave: the latest reading says so, but the fallback keeps dividing by the
    # largest count of the last 30 s (a worker seen then may still be running).
    await registry.deregister("w2")
    await registry.deregister("w3")
    await asyncio.sleep(0.3)
    assert (limiter.live_workers_seen, limiter.fallback_parts) == (1, 3)
    if client is not None:
        await client.aclose()


async def test_registry_forgets_silent_workers(redis_url: str) -> None:
    clock = [1000.0]
    memory = MemoryWorkerRegistry(clock=lambda: clock[0])
    await memory.register("a", "index")
    await memory.register("b", "acte")
    clock[0] += 20
    await memory.register("b", "acte")
    assert await memory.live_workers() == {"index": ["a"], "acte": ["b"]}
    clock[0] += 15
    assert await memory.live_workers() == {"acte": ["b"]}

    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    shared = RedisWorkerRegistry(client, "contract")
    await shared.register("x", "index")
    await shared.register("y", "index")
    await client.hset("{contract}:workers", "old", "acte|1.0")
    assert await shared.live_workers() == {"index": ["x", "y"]}
    assert not await client.hexists("{contract}:workers", "old")
    assert await client.ttl("{contract}:workers") > 0
    await shared.deregister("x")
    assert await shared.live_workers() == {"index": ["y"]}
    await client.aclose()


async def test_every_redis_key_has_a_ttl_and_one_hash_tag(redis_url: str) -> None:
    import redis.asyncio as aioredis

    limiter = await create_limiter(redis_url, BUDGET, namespace="ttl", rpd=10, worker_id="w")
    async with limiter.acquire(5, model="flash", lane="acte") as grant:
        await grant.settle(3)
    await limiter.report_rate_limited(model="flash", retry_after_s=0.01)
    client = aioredis.from_url(redis_url)
    keys = [k.decode() for k in await client.keys("*")]
    assert keys
    for key in keys:
        assert await client.ttl(key) > 0, key
        assert key.startswith("{ttl"), key
    assert {k.split("}")[0] for k in keys if "default" in k} == {"{ttl:default"}
    await limiter.aclose()
    await client.aclose()
