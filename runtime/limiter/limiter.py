"""The limiter of one process: local semaphore, FIFO waiters, grants, 429 feedback, fallback.

Per (model, lane) the waiters of a process queue in FIFO order and only the one that
leads talks to the store: in one script call it books itself and the waiters behind it
that have a free semaphore slot, then passes the lead on when the last of those slots
is due. Redis load therefore grows with admissions, not with waiters, and a busy
process admits many waiters per round trip. While Redis is unreachable the process
admits from memory against its share of the budget (budget / the most live workers
read in the 30 s before Redis went away; the count is read every second) and returns to
Redis by itself."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import structlog

from runtime.errors import ConfigurationError
from runtime.limiter import budget
from runtime.limiter.budget import Budget, Limits
from runtime.limiter.errors import DailyQuotaExhausted, RequestTooLarge, StoreUnavailable
from runtime.limiter.grant import Grant, LaneUsage, LimiterStats, Usage, release_quietly
from runtime.limiter.memory import MemoryRateStore
from runtime.limiter.queue import Booking, Waiter, WaiterQueue, admitting
from runtime.limiter.registry import (
    HEARTBEAT_S,
    LIVE_REFRESH_S,
    LiveCounts,
    WorkerRegistry,
    live_count,
)
from runtime.limiter.store import RateStore

log = structlog.get_logger()
T = TypeVar("T")
SHARED_POOL = "default"  # the key of every model without a budget of its own
MAX_BATCH = 64  # waiters of one queue booked in one call at most
PROBE_S = 0.5
_NAME = re.compile(r"^[A-Za-z0-9_.\-/]*$")
_CHECKED: set[str] = set()  # names already found valid (a few models and lanes)


def _check_name(kind: str, name: str) -> str:
    if name in _CHECKED:
        return name
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: use letters, digits and _ . - / only")
    if len(_CHECKED) < 1_000:
        _CHECKED.add(name)
    return name


class Limiter:
    """Admits calls of every process of the fleet within one budget per model."""

    def __init__(
        self,
        default_budget: Budget,
        *,
        store: RateStore | None = None,
        registry: WorkerRegistry | None = None,
        max_inflight: int = 64,
        lane_shares: Mapping[str, float] | None = None,
        model_budgets: Mapping[str, Budget] | None = None,
        rpd: int | None = None,
        worker_id: str | None = None,
        worker_type: str = "worker",
        heartbeat_s: float = HEARTBEAT_S,
        live_refresh_s: float = LIVE_REFRESH_S,
        fallback: MemoryRateStore | None = None,
    ) -> None:
        shares = dict(lane_shares or {})
        for lane, share in shares.items():
            _check_name("lane", lane)
            if not 0 < share <= 1:
                raise ConfigurationError("GEMINI_LANE_SHARES", f"share of {lane} not in (0, 1]")
        if sum(shares.values()) > 1 + 1e-9:
            raise ConfigurationError("GEMINI_LANE_SHARES", "the shares add up to more than 1")
        self.budget = default_budget
        self.lane_shares = shares
        self.model_budgets = {_check_name("model", m): b for m, b in (model_budgets or {}).items()}
        self.rpd = rpd
        self.max_inflight = max_inflight
        self.worker_id = worker_id
        self.worker_types: str | Sequence[str] = worker_type
        self.stats = LimiterStats()
        self._primary = store
        self._fallback = fallback or MemoryRateStore()
        self._registry = registry
        self._heartbeat_s = heartbeat_s
        self._live_refresh_s = live_refresh_s
        self._semaphore = asyncio.Semaphore(max_inflight)
        self._queues: dict[tuple[str, str], WaiterQueue] = {}
        self._routes: dict[str, tuple[str, Limits]] = {}
        self._live = LiveCounts()
        self._degraded = store is None
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # set (and replaced) when tokens come back
        self._probe: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._id_prefix = f"{worker_id or os.getpid()}.{secrets.token_hex(3)}."

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Check the store, register the worker, start heartbeating and counting the fleet."""
        if self._primary is not None:
            try:
                await self._primary.ping()
            except StoreUnavailable as exc:
                self._enter_fallback(exc)
        if self._registry is not None:
            await self._beat()
            self._spawn_task(self._heartbeat())
            self._spawn_task(self._watch_live())

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registry is not None and self.worker_id is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._registry.deregister(self.worker_id)
        if self._primary is not None:
            await self._primary.aclose()

    async def register(self, worker_id: str, worker_types: str | Sequence[str]) -> None:
        """Announce this worker (one type or several); heartbeats keep it alive from now on."""
        self.worker_id = worker_id
        self.worker_types = worker_types
        if self._registry is not None:
            await self._beat()  # the heartbeat loop started with the limiter goes on

    async def deregister(self, worker_id: str) -> None:
        """Leave the registry at once instead of being declared dead 30 s later."""
        if self._registry is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._registry.deregister(worker_id)
        if worker_id == self.worker_id:
            self.worker_id = None

    async def live_workers(self) -> dict[str, list[str]]:
        """Live workers by type, as the registry sees them."""
        if self._registry is None:
            return {}
        return await self._registry.live_workers()

    @property
    def degraded(self) -> bool:
        """True while the shared store is unreachable (or absent) and admissions are local."""
        return self._degraded and self._primary is not None

    @property
    def inflight(self) -> int:
        """Admitted calls of this process not yet finished (including booked slots)."""
        return self.max_inflight - self._semaphore._value

    @property
    def live_workers_seen(self) -> int:
        """The live workers of the latest reading of the registry."""
        return self._live.latest

    @property
    def fallback_parts(self) -> int:
        """What the budget is divided by while Redis is unreachable (see ``LiveCounts``)."""
        return self._live.largest

    def _spawn_task(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _shielded(self, coroutine: Awaitable[None]) -> None:
        # Shielded so that a cancelled caller still gives its reservation back.
        await asyncio.shield(self._spawn_task(coroutine))

    async def _beat(self) -> None:
        assert self._registry is not None
        try:
            if self.worker_id is not None:
                await self._registry.register(self.worker_id, self.worker_types)
        except StoreUnavailable:
            return
        await self._count_live()

    async def _count_live(self) -> None:
        assert self._registry is not None
        try:
            count = live_count(await self._registry.live_workers())
        except StoreUnavailable:
            return  # keep the counts seen: the fallback divides by them
        self._live.add(asyncio.get_running_loop().time(), count)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._beat()

    async def _watch_live(self) -> None:
        """Read the live count often: a fleet that just started grows within seconds."""
        while True:
            await asyncio.sleep(self._live_refresh_s)
            if not self.degraded:
                await self._count_live()

    # -- routing and fallback ---------------------------------------------------------

    def _route(self, model: str) -> tuple[str, Limits]:
        route = self._routes.get(model)
        if route is None:
            key = model if model in self.model_budgets else SHARED_POOL
            chosen = self.model_budgets.get(model, self.budget)
            route = self._routes[model] = (
                key,
                Limits.of(chosen, rpd=self.rpd, shares=self.lane_shares),
            )
        return route

    def _enter_fallback(self, exc: Exception) -> None:
        self.stats.store_errors += 1
        if not self._degraded:
            self._degraded = True
            log.warning(
                "limiter.redis_unreachable",
                error=str(exc),
                share_of_budget=f"1/{self._live.largest}",
            )
        if self._probe is None or self._probe.done():
            self._probe = self._spawn_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        assert self._primary is not None
        while True:
            await asyncio.sleep(PROBE_S)
            try:
                await self._primary.ping()
            except StoreUnavailable:
                continue
            self._degraded = False
            log.warning("limiter.redis_back")
            return

    async def _decide(
        self, key: str, limits: Limits, op: Callable[[RateStore, Limits], Awaitable[T]]
    ) -> tuple[RateStore, Limits, T]:
        """Run ``op`` on Redis, or on the local share of the budget while it is away."""
        if self._primary is not None and not self._degraded:
            try:
                return self._primary, limits, await op(self._primary, limits)
            except StoreUnavailable as exc:
                self._enter_fallback(exc)
        local = limits.divided(self._live.largest) if self._primary is not None else limits
        return self._fallback, local, await op(self._fallback, local)

    # -- admissions -------------------------------------------------------------------

    def acquire(self, tokens: int, *, model: str, lane: str = "", variance: int = 0) -> Admission:
        """Wait until one request of ``tokens`` fits the fleet's budget; use as ``async with``.

        ``tokens`` is the expected size of the call; ``variance`` (tokens squared) says how
        unsure it is: the fleet holds one margin for the variances of the calls not yet
        settled instead of padding each call. Raises ``RequestTooLarge`` for a request
        above the whole budget and ``DailyQuotaExhausted`` when the requests-per-day
        budget is spent.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        if variance < 0:
            raise ValueError(f"variance must be >= 0, not {variance}")
        return Admission(
            self, tokens, _check_name("model", model), _check_name("lane", lane), variance
        )

    def _grant_id(self, variance: int) -> str:
        grant_id = f"{self._id_prefix}{next(self._ids)}"
        if variance > 0:
            return f"{grant_id}{budget.SPREAD_MARK}{min(variance, budget.MAX_SPREAD)}"
        return grant_id

    async def _admit(self, tokens: int, model: str, lane: str, variance: int = 0) -> Grant:
        key, limits = self._route(model)
        if tokens > limits.tpm:
            raise RequestTooLarge(tokens, limits.tpm, model)
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter = Waiter(self._grant_id(variance), tokens, loop.create_future(), variance)
        queue = self._queues.get((key, lane))
        if queue is None:
            queue = self._queues[(key, lane)] = WaiterQueue()
        try:
            if queue.led:
                queue.waiters.append(waiter)
                booking = await waiter.future
            else:
                queue.led = True
                booking = None
            if booking is None:  # this waiter leads the queue now
                waiter.leading = True
                booking = await self._lead(queue, key, limits, model, lane, waiter)
            waiter.booking = booking
            # The slot is measured from the store's clock when it answered.
            delay = (booking.decision.value - booking.decision.now) / 1e6
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            await self._abandon(queue, waiter, key, lane)
            raise
        wait_s = loop.time() - started
        self.stats.admissions += 1
        self.stats.wait_s_total += wait_s
        self.stats.tokens_reserved += tokens
        shared = booking.store is not self._fallback
        if not shared and self._primary is not None:
            self.stats.fallback_admissions += 1
        return Grant(
            waiter.grant_id,
            model,
            key,
            lane,
            tokens,
            wait_s,
            booking.decision.value / 1e6,  # the slot
            shared,
            booking.store,
            booking.limits,
            self.stats,
            self._shielded,
            self._wake_heads,
        )

    async def _lead(
        self, queue: WaiterQueue, key: str, limits: Limits, model: str, lane: str, head: Waiter
    ) -> Booking:
        """Book the head and the waiters behind it that have a free slot, in one call.

        The lead passes on once the last slot booked here is reached: a queue has one
        batch booked ahead of now at most, and asks the store again when it is due.
        """
        await self._semaphore.acquire()
        head.holds_slot = True
        while True:
            batch = [head]
            while queue.waiters and len(batch) < MAX_BATCH and not self._semaphore.locked():
                follower = queue.waiters.popleft()
                if follower.future.done():
                    continue  # cancelled while it waited
                await self._semaphore.acquire()  # free: returns at once; ours until booked
                batch.append(follower)
            requests = [(w.grant_id, w.tokens) for w in batch]
            asked = self._primary if self._primary is not None and not self._degraded else None
            try:
                store, used, decisions = await self._decide(
                    key, limits, admitting(key, requests, lane)
                )
            except BaseException:
                # The answer is lost, not necessarily the bookings: give them all back.
                self._requeue(queue, batch[1:], renew=True)
                store = asked or self._fallback
                await self._shielded(self._release_all(store, key, limits, requests, lane))
                raise
            # The store decides in order and stops at the first request it does not admit.
            admitted = len(decisions) - (decisions[-1].kind != budget.ADMIT)
            for k in range(1, admitted):
                follower = batch[k]
                if follower.future.done():  # cancelled while it was being booked
                    self._semaphore.release()
                    self._spawn_task(
                        release_quietly(store, key, used, follower.grant_id, follower.tokens, lane)
                    )
                else:
                    follower.holds_slot = True  # the slot is the follower's from now on
                    follower.future.set_result(Booking(store, used, decisions[k]))
            if len(batch) > max(1, admitted):
                self._requeue(queue, batch[max(1, admitted) :], renew=False)
            if admitted:
                break
            refused = decisions[0]
            if refused.kind == budget.TOO_LARGE:
                raise RequestTooLarge(head.tokens, used.tpm, model)
            if refused.kind == budget.DAY_EXHAUSTED:
                raise DailyQuotaExhausted(model, used.rpd, refused.value / 1e6)
            await self._until_room(refused.value / 1e6, limits)
        last = decisions[admitted - 1]
        hand_on_us = last.value - last.now
        head.leading = False
        if hand_on_us > 0:
            asyncio.get_running_loop().call_later(hand_on_us / 1e6, queue.hand_on)
        else:
            queue.hand_on()
        return Booking(store, used, decisions[0])

    def _wake_heads(self) -> None:
        """Tokens came back in this process: the queues told to wait ask again at once."""
        room, self._room = self._room, asyncio.Event()
        room.set()

    async def _until_room(self, delay_s: float, limits: Limits) -> None:
        """Sleep until the store's time to ask again, or sooner: until tokens come back in
        this process, and at most a sixteenth of a window, so that a head sees the room
        that the other processes' refunds make."""
        room = self._room
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(delay_s, limits.window_us / 16e6)):
                await room.wait()

    def _requeue(self, queue: WaiterQueue, waiters: list[Waiter], *, renew: bool) -> None:
        """Put waiters that were not booked back at the front of the queue, in order."""
        for waiter in reversed(waiters):
            self._semaphore.release()
            if renew:  # a release of the old id may still be on its way
                waiter.grant_id = self._grant_id(waiter.variance)
            if not waiter.future.done():
                queue.waiters.appendleft(waiter)

    @staticmethod
    async def _release_all(
        store: RateStore, key: str, limits: Limits, requests: list[tuple[str, int]], lane: str
    ) -> None:
        for grant_id, tokens in requests:
            await release_quietly(store, key, limits, grant_id, tokens, lane)

    async def _abandon(self, queue: WaiterQueue, waiter: Waiter, key: str, lane: str) -> None:
        """A waiter leaves on an exception: pass its lead on, free its slot and booking."""
        future = waiter.future
        if not future.done():
            future.cancel()  # its place in the queue is skipped
        elif waiter.booking is None and not future.cancelled():
            waiter.booking = future.result()
            if waiter.booking is None and not waiter.leading:
                queue.hand_on()  # told to lead, gone before it could
        if waiter.leading:
            waiter.leading = False
            queue.hand_on()
        if waiter.holds_slot:
            waiter.holds_slot = False
            self._semaphore.release()
        if waiter.booking is not None:
            booking = waiter.booking
            await self._shielded(
                release_quietly(
                    booking.store, key, booking.limits, waiter.grant_id, waiter.tokens, lane
                )
            )

    # -- feedback and monitoring ------------------------------------------------------

    async def report_rate_limited(
        self, *, model: str, retry_after_s: float | None = None, quota_id: str | None = None
    ) -> None:
        """Gemini answered 429: pause this model fleet-wide; a quota 429 also cuts the budget.

        Without ``retry_after_s`` the pause lasts a sixth of the window. Only a 429 that
        names its quota (``quota_id``) lowers the effective budget.
        """
        key, limits = self._route(model)
        self.stats.rate_limited_reports += 1
        if quota_id is not None:
            self.stats.quota_reports += 1
        delay_us = (
            round(retry_after_s * 1e6) if retry_after_s is not None else limits.window_us // 6
        )
        log.info("limiter.rate_limited", model=model, retry_after_s=retry_after_s, quota=quota_id)
        await self._decide(
            key, limits, lambda s, lim: s.report(key, lim, delay_us, quota_id is not None)
        )

    async def usage(self, *, model: str) -> Usage:
        """Requests and tokens of ``model``'s budget in the rolling window ending now.

        Slots already booked for a moment later are reported apart (``booked_*``).
        """
        key, limits = self._route(model)
        _, used, snap = await self._decide(key, limits, lambda s, lim: s.snapshot(key, lim))
        rpm, tpm = budget.effective_limits(used, snap.factor_ppm)
        return Usage(
            model=model,
            requests=snap.requests,
            tokens=snap.tokens,
            budget=self.model_budgets.get(model, self.budget),
            effective_rpm=rpm,
            effective_tpm=tpm,
            factor=snap.factor_ppm / budget.PPM,
            paused_until=snap.pause_until / 1e6 if snap.pause_until > snap.now else None,
            paused_for_s=max(0, snap.pause_until - snap.now) / 1e6,
            lanes={
                lane: LaneUsage(requests, tokens, self.lane_shares.get(lane))
                for lane, (requests, tokens) in snap.lanes.items()
            },
            requests_today=snap.requests_today,
            rpd=self.rpd,
            degraded=self.degraded,
            booked_requests=snap.booked_requests,
            booked_tokens=snap.booked_tokens,
            margin_tokens=math.ceil(used.z_milli * math.sqrt(snap.unsettled_var) / 1000),
        )


class Admission:
    """``async with limiter.acquire(...) as grant``: the slot is held for the call."""

    def __init__(
        self, limiter: Limiter, tokens: int, model: str, lane: str, variance: int = 0
    ) -> None:
        self._limiter = limiter
        self._tokens = tokens
        self._model = model
        self._lane = lane
        self._variance = variance

    def __aenter__(self) -> Awaitable[Grant]:
        # The admission itself, handed to ``async with`` without a coroutine around it.
        return self._limiter._admit(self._tokens, self._model, self._lane, self._variance)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # An unsettled grant keeps its estimate: the call may well have reached the API.
        self._limiter._semaphore.release()


async def create_limiter(
    redis_url: str | None,
    budget: Budget,
    *,
    namespace: str = "gemini",
    max_inflight: int = 64,
    lane_shares: Mapping[str, float] | None = None,
    model_budgets: Mapping[str, Budget] | None = None,
    rpd: int | None = None,
    worker_id: str | None = None,
    worker_type: str = "worker",
    heartbeat_s: float = HEARTBEAT_S,
    live_refresh_s: float = LIVE_REFRESH_S,
    timeout_s: float = 2.0,
) -> Limiter:
    """A started limiter: fleet-wide on ``redis_url``, or in this process only when None.

    ``model_budgets`` gives some models a budget of their own; every other model shares
    ``budget``. ``rpd`` is a requests-per-day budget per model. With ``worker_id`` the
    process registers in the worker registry (heartbeat every ``heartbeat_s``); the live
    count is read every ``live_refresh_s`` either way. Redis
    need not be reachable at start: the limiter admits locally until it answers.
    """
    from runtime.limiter.redis import RedisRateStore, connect
    from runtime.limiter.registry import MemoryWorkerRegistry, RedisWorkerRegistry

    _check_name("namespace", namespace)
    store: RateStore | None = None
    registry: WorkerRegistry
    if redis_url is None:
        registry = MemoryWorkerRegistry()
    else:
        client = connect(redis_url, timeout_s)
        store = RedisRateStore(client, namespace, timeout_s=timeout_s)
        registry = RedisWorkerRegistry(client, namespace)
    limiter = Limiter(
        budget,
        store=store,
        registry=registry,
        max_inflight=max_inflight,
        lane_shares=lane_shares,
        model_budgets=model_budgets,
        rpd=rpd,
        worker_id=worker_id,
        worker_type=worker_type,
        heartbeat_s=heartbeat_s,
        live_refresh_s=live_refresh_s,
    )
    await limiter.start()
    return limiter
