"""What an admission hands to its caller, and the figures the limiter reports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from runtime.limiter.budget import SPREAD_MARK, Budget, Limits
from runtime.limiter.errors import StoreUnavailable
from runtime.limiter.store import RateStore

log = structlog.get_logger()


@dataclass
class LimiterStats:
    """Running counters of one limiter, for the metrics endpoint."""

    admissions: int = 0
    wait_s_total: float = 0.0
    rate_limited_reports: int = 0
    quota_reports: int = 0
    tokens_reserved: int = 0
    tokens_settled: int = 0
    releases: int = 0
    fallback_admissions: int = 0
    store_errors: int = 0


@dataclass(frozen=True)
class LaneUsage:
    """One lane's share of the current window."""

    requests: int
    tokens: int
    share: float | None


@dataclass(frozen=True)
class Usage:
    """A snapshot of one model's budget, for monitoring.

    ``requests`` and ``tokens`` count the rolling window ending now, ``(now - W, now]``:
    the calls already let through and, right after a state loss, the phantom occupancy
    that stands for the forgotten window (the lanes likewise). Slots booked a moment
    ahead are not in the window yet: ``booked_requests`` and ``booked_tokens`` count them.
    """

    model: str
    requests: int
    tokens: int
    budget: Budget
    effective_rpm: int
    effective_tpm: int
    factor: float
    paused_until: float | None  # epoch seconds
    paused_for_s: float = 0.0  # what is left of the pause, seconds
    lanes: dict[str, LaneUsage] = field(default_factory=dict)
    requests_today: int = 0
    rpd: int | None = None
    degraded: bool = False  # True while Redis is unreachable and the process admits alone
    booked_requests: int = 0  # slots booked ahead of now, not in the window yet
    booked_tokens: int = 0
    # z x the deviation of the calls not settled yet: what the fleet margin holds (the
    # headroom above the budget first, see runtime.limiter.budget).
    margin_tokens: int = 0


class Grant:
    """An admitted request: settle it with the real usage, or release it if never sent.

    One is built for every admission: slots and positional arguments keep that cheap.
    """

    __slots__ = (
        "_key",
        "_limits",
        "_room",
        "_spawn",
        "_stats",
        "_store",
        "actual_tokens",
        "id",
        "lane",
        "model",
        "released",
        "shared",
        "slot",
        "tokens",
        "wait_s",
    )

    def __init__(
        self,
        grant_id: str,
        model: str,
        key: str,
        lane: str,
        tokens: int,
        wait_s: float,
        slot: float,
        shared: bool,
        store: RateStore,
        limits: Limits,
        stats: LimiterStats,
        spawn: Callable[[Awaitable[None]], Awaitable[None]],
        room: Callable[[], None],
    ) -> None:
        self.id = grant_id
        self.model = model
        self.lane = lane
        self.tokens = tokens
        self.wait_s = wait_s  # time spent in acquire, for logs and metrics
        self.slot = slot  # the booked admission time (epoch seconds, the store's clock)
        self.shared = shared  # False: admitted locally while the shared store was away
        self.actual_tokens: int | None = None
        self.released = False
        self._key = key
        self._store = store
        self._limits = limits
        self._stats = stats
        self._spawn = spawn
        self._room = room  # tells this process's waiting queues that tokens came back

    @property
    def done(self) -> bool:
        return self.released or self.actual_tokens is not None

    async def settle(self, actual_tokens: int) -> None:
        """Charge or refund the difference with the estimate; a second call does nothing."""
        if self.done:
            return
        self.actual_tokens = actual_tokens
        self._stats.tokens_settled += actual_tokens
        if actual_tokens == self.tokens and SPREAD_MARK not in self.id:
            return  # nothing to change: no difference, no variance held in the margin
        try:
            await self._store.settle(
                self._key, self._limits, self.id, self.tokens, actual_tokens, self.lane
            )
        except StoreUnavailable:
            # The reservation keeps its estimate in a store we cannot reach; it expires.
            self._stats.store_errors += 1
            return
        self._room()  # a refund, or a variance no longer held in the margin

    async def release(self) -> None:
        """Give the request and its tokens back: the call never reached the API."""
        if self.done:
            return
        self.released = True
        self._stats.releases += 1
        await self._spawn(self._give_back())

    async def _give_back(self) -> None:
        await release_quietly(self._store, self._key, self._limits, self.id, self.tokens, self.lane)
        self._room()


async def release_quietly(
    store: RateStore, key: str, limits: Limits, grant_id: str, tokens: int, lane: str
) -> None:
    """Give a booking back (as it was booked); a store out of reach lets it expire instead."""
    try:
        await store.release(key, limits, grant_id, tokens, lane)
    except StoreUnavailable:
        log.info("limiter.release_lost", grant_id=grant_id)
