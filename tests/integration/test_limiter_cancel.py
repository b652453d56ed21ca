"""Cancelling an admission at any await point leaks nothing: no slot, no reservation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from runtime.limiter import Budget, Limiter, MemoryRateStore, RedisRateStore
from runtime.limiter.budget import Decision, Limits
from runtime.limiter.redis import connect

# Booking a whole window ahead: these tests hold waiters behind far bookings.
BUDGET = Budget(rpm=50, tpm=20_000, window_s=1.0, booking_horizon_s=1.0)


class ReplyLost(MemoryRateStore):
    """A store whose admission answer is held back: the booking exists, the caller waits."""

    def __init__(self, inner: MemoryRateStore | RedisRateStore) -> None:
        super().__init__()
        self.inner = inner
        self.booked = asyncio.Event()
        self.hold = True
        self.batches: list[int] = []  # waiters booked by each call

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]:
        self.batches.append(len(requests))
        decisions = await self.inner.admit_many(model, limits, requests, lane)
        if self.hold:
            self.booked.set()
            await asyncio.Event().wait()  # the answer never comes back
        return decisions

    async def release(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> bool:
        return await self.inner.release(model, limits, grant_id, tokens, lane)

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
    assert not any(queue.waiting for queue in limiter._queues.values())


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
    assert not any(queue.waiting for queue in limiter._queues.values())


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


async def admit_and_release(limiter: Limiter) -> None:
    async with limiter.acquire(10, model="flash", lane="acte") as grant:
        await grant.release()


@pytest.fixture
async def fast_limiter(store: ReplyLost) -> AsyncIterator[Limiter]:
    """Slots paced 0.1 ms apart: waiters queued together fall within one batch's span."""
    budget = Budget(rpm=10_000, tpm=1_000_000, window_s=1.0, booking_horizon_s=1.0)
    result = Limiter(budget, store=store, max_inflight=4)
    await result.start()
    yield result
    await result.aclose()


async def test_waiters_queued_behind_a_booking_are_booked_in_one_call(
    fast_limiter: Limiter, store: ReplyLost
) -> None:
    # The first is booked at the end of the pause and the lead passes on at that slot:
    # whoever queued meanwhile is booked together, as many as the free semaphore slots.
    limiter = fast_limiter
    await limiter.report_rate_limited(model="flash", retry_after_s=0.2)
    tasks = [asyncio.create_task(admit_and_release(limiter)) for _ in range(6)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sum(store.batches) == 6
    assert store.batches[0] == 1
    assert store.batches[1] >= 3  # the first may still hold its slot: 3 or 4 together
    await nothing_leaked(limiter)


async def head_and_follower_booked_together(
    limiter: Limiter, store: ReplyLost, follower: Callable[[Limiter], Awaitable[None]]
) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """A head and one follower booked by one call whose answer is held back."""
    await limiter.report_rate_limited(model="flash", retry_after_s=0.3)
    # Booked at the end of the pause, when the lead passes on; it gives its booking back.
    first = asyncio.create_task(admit_and_release(limiter))
    await asyncio.sleep(0.05)
    store.hold = True
    head = asyncio.create_task(enter(limiter))
    behind = asyncio.create_task(follower(limiter))
    await store.booked.wait()
    assert store.batches[-1] == 2
    await first
    return head, behind


async def test_cancelled_while_booked_together_with_the_head(
    fast_limiter: Limiter, store: ReplyLost
) -> None:
    head, behind = await head_and_follower_booked_together(fast_limiter, store, enter)
    assert await reservations(fast_limiter) == 2
    await cancel(behind)
    await cancel(head)
    store.hold = False
    await nothing_leaked(fast_limiter)


async def test_followers_go_on_when_their_head_is_cancelled(
    fast_limiter: Limiter, store: ReplyLost
) -> None:
    head, behind = await head_and_follower_booked_together(fast_limiter, store, admit_and_release)
    store.hold = False
    await cancel(head)
    await asyncio.wait_for(behind, 5)  # it leads in turn and is booked
    assert store.batches[-1] == 1
    await nothing_leaked(fast_limiter)
