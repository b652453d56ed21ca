"""Cancelling an admission at any await point leaks nothing: no slot, no reservation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from runtime.limiter import Budget, Limiter, MemoryRateStore, RedisRateStore
from runtime.limiter.budget import Decision, Limits
from runtime.limiter.redis import connect

BUDGET = Budget(rpm=50, tpm=20_000, window_s=1.0)


class ReplyLost(MemoryRateStore):
    """A store whose admission answer is held back: the booking exists, the caller waits."""

    def __init__(self, inner: MemoryRateStore | RedisRateStore) -> None:
        super().__init__()
        self.inner = inner
        self.booked = asyncio.Event()
        self.hold = True

    async def admit(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> Decision:
        decision = await self.inner.admit(model, limits, grant_id, tokens, lane)
        if self.hold:
            self.booked.set()
            await asyncio.Event().wait()  # the answer never comes back
        return decision

    async def release(self, model: str, limits: Limits, grant_id: str) -> bool:
        return await self.inner.release(model, limits, grant_id)

    async def snapshot(self, model: str, limits: Limits):  # type: ignore[no-untyped-def]
        return await self.inner.snapshot(model, limits)

    async def report(self, model: str, limits: Limits, retry_after_us: int, teach: bool) -> None:
        await self.inner.report(model, limits, retry_after_us, teach)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(params=["redis", "memory"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("redis_url") if request.param == "redis" else None  # type: ignore[no-any-return]


@pytest.fixture
async def store(backend_url: str | None) -> AsyncIterator[ReplyLost]:
    inner: MemoryRateStore | RedisRateStore
    if backend_url is None:
        inner = MemoryRateStore()
    else:
        inner = RedisRateStore(connect(backend_url), "cancel")
    wrapper = ReplyLost(inner)
    wrapper.hold = False
    return wrapper


@pytest.fixture
async def limiter(store: ReplyLost) -> AsyncIterator[Limiter]:
    result = Limiter(BUDGET, store=store, max_inflight=4)
    await result.start()
    yield result
    await result.aclose()


async def reservations(limiter: Limiter) -> int:
    """The acte lane's requests: in the window ending now, or booked ahead of it."""
    usage = await limiter.usage(model="flash")
    in_window = usage.lanes["acte"].requests if "acte" in usage.lanes else 0
    return in_window + usage.booked_requests  # only this lane books in these tests


async def nothing_leaked(limiter: Limiter) -> None:
    assert limiter.inflight == 0
    assert await reservations(limiter) == 0
    assert not any(lock.locked() for lock in limiter._queues.values())


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def enter(limiter: Limiter) -> None:
    async with limiter.acquire(10, model="flash", lane="acte"):
        await asyncio.Event().wait()


async def test_cancelled_while_sleeping_until_the_booked_slot(limiter: Limiter) -> None:
    await limiter.report_rate_limited(model="flash", retry_after_s=0.5)  # slot: end of pause
    task = asyncio.create_task(enter(limiter))
    await asyncio.sleep(0.1)
    assert await reservations(limiter) == 1
    await cancel(task)
    await nothing_leaked(limiter)


async def test_cancelled_while_queued_behind_the_head(limiter: Limiter) -> None:
    await limiter.report_rate_limited(model="flash", retry_after_s=0.5)
    head = asyncio.create_task(enter(limiter))
    behind = asyncio.create_task(enter(limiter))
    await asyncio.sleep(0.1)
    await cancel(behind)
    assert await reservations(limiter) == 1
    await cancel(head)
    await nothing_leaked(limiter)


async def test_cancelled_while_told_to_wait_beyond_the_horizon(limiter: Limiter) -> None:
    await limiter.report_rate_limited(model="flash", retry_after_s=3.0)  # beyond one window
    task = asyncio.create_task(enter(limiter))
    await asyncio.sleep(0.1)
    assert limiter.inflight == 1
    await cancel(task)
    await nothing_leaked(limiter)


async def test_cancelled_while_waiting_for_a_semaphore_slot(limiter: Limiter) -> None:
    holders = [asyncio.create_task(enter(limiter)) for _ in range(4)]
    await asyncio.sleep(0.3)
    waiter = asyncio.create_task(enter(limiter))
    await asyncio.sleep(0.05)
    assert limiter.inflight == 4
    await cancel(waiter)
    for task in holders:
        await cancel(task)  # cancelled inside the call: the estimate stays charged
    assert limiter.inflight == 0
    assert not any(lock.locked() for lock in limiter._queues.values())


async def test_cancelled_after_booking_before_the_answer(
    limiter: Limiter, store: ReplyLost
) -> None:
    store.hold = True
    task = asyncio.create_task(enter(limiter))
    await store.booked.wait()
    assert await reservations(limiter) == 1
    await cancel(task)
    store.hold = False
    await nothing_leaked(limiter)


async def test_the_queue_moves_on_after_cancellations(limiter: Limiter) -> None:
    tasks = [asyncio.create_task(enter(limiter)) for _ in range(3)]
    await asyncio.sleep(0)
    for task in tasks:
        await cancel(task)
    async with limiter.acquire(1, model="flash", lane="acte") as grant:
        await grant.settle(1)
    assert limiter.inflight == 0
