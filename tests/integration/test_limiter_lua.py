"""The Lua script and the pure core take the same decisions on the same scenarios.

The script runs in its test mode (time passed in), against a real Redis; the core runs
on a ``ModelState`` in memory. Every answer and every snapshot must be identical.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import redis.asyncio as aioredis

from runtime.limiter import budget
from runtime.limiter.budget import Budget, Limits, ModelState
from runtime.limiter.redis import RedisRateStore, model_keys

T0 = 1_700_000_000_000_000
W = 1_000_000


def limits(
    shares: dict[str, float] | None = None, rpd: int | None = None, headroom: int = 0
) -> Limits:
    budget = Budget(rpm=12, tpm=1_000, window_s=1.0, tpm_headroom=headroom)
    return Limits.of(budget, rpd=rpd, shares=shares)


class Twin:
    """The same operations applied to the core and to the script, answers compared."""

    def __init__(self, store: RedisRateStore, lim: Limits) -> None:
        self.store = store
        self.lim = lim
        self.state = ModelState()

    async def admit(self, now: int, gid: str, tokens: int, lane: str) -> tuple[int, int]:
        core = budget.admit(self.state, self.lim, now, gid, tokens, lane)
        lua = await self.store.call("m", self.lim, "admit", [lane, gid, tokens], now=now)
        assert [int(str(x)) for x in lua] == [core.kind, core.value, core.now]
        return core.kind, core.value

    async def admit_many(self, now: int, requests: list[tuple[str, int]], lane: str) -> list[int]:
        core = budget.admit_many(self.state, self.lim, now, requests, lane)
        args: list[str | int] = [lane]
        for gid, tokens in requests:
            args += [gid, tokens]
        lua = await self.store.call("m", self.lim, "admit", args, now=now)
        expected = [x for decision in core for x in (decision.kind, decision.value)] + [now]
        assert [int(str(x)) for x in lua] == expected
        return [decision.kind for decision in core]

    async def settle(self, now: int, gid: str, estimate: int, actual: int, lane: str) -> None:
        core = budget.settle(self.state, self.lim, now, gid, estimate, actual, lane)
        lua = await self.store.call("m", self.lim, "settle", [gid, estimate, actual, lane], now=now)
        assert int(str(lua[0])) == core

    async def release(self, now: int, gid: str, tokens: int, lane: str) -> None:
        core = budget.release(self.state, self.lim, now, gid, tokens, lane)
        lua = await self.store.call("m", self.lim, "release", [gid, tokens, lane], now=now)
        assert (int(str(lua[0])) == 1) == core

    async def report(self, now: int, retry_us: int, teach: bool) -> None:
        budget.report(self.state, self.lim, now, retry_us, teach)
        await self.store.call("m", self.lim, "report", [retry_us, "1" if teach else "0"], now=now)

    async def compare_snapshots(self, now: int) -> None:
        core = budget.snapshot(self.state, self.lim, now)
        out = await self.store.call("m", self.lim, "snapshot", [], now=now)
        head = [int(str(x)) for x in out[:9]]
        assert head == [
            core.now,
            core.requests,
            core.tokens,
            core.factor_ppm,
            core.pause_until,
            core.requests_today,
            core.booked_requests,
            core.booked_tokens,
            core.unsettled_var,
        ]
        rest = out[9:]
        lanes = {
            bytes(rest[i]).decode(): (int(str(rest[i + 1])), int(str(rest[i + 2])))  # type: ignore[call-overload]
            for i in range(0, len(rest), 3)
        }
        assert lanes == core.lanes


@pytest.fixture
async def store(redis_url: str) -> RedisRateStore:
    client = aioredis.from_url(redis_url)
    result = RedisRateStore(client, "twin")
    yield result  # type: ignore[misc]
    await client.aclose()


async def test_scripted_scenario_books_identically(store: RedisRateStore) -> None:
    twin = Twin(store, limits())
    now = T0
    # Fresh state: the phantom window makes the first slot wait one step.
    kind, at = await twin.admit(now, "a", 100, "x")
    assert kind == budget.ADMIT
    assert at > now
    for n in range(20):
        kind, at = await twin.admit(now + n * 1000, f"g{n}", 90, "x")
        if kind == budget.ADMIT:
            await twin.settle(at + 5000, f"g{n}", 90, 40 + n, "x")
    await twin.release(now + 30_000, "g3", 90, "x")  # settled: no longer there as booked
    await twin.release(now + 30_000, "late", 90, "x")  # never booked
    await twin.report(now + 40_000, 200_000, True)
    await twin.report(now + 41_000, 100_000, True)  # within a quarter window: no second cut
    await twin.admit(now + 50_000, "after-pause", 10, "x")
    await twin.compare_snapshots(now + 60_000)
    await twin.compare_snapshots(now + 3 * W)


async def test_bookings_ahead_are_reported_apart_alike(store: RedisRateStore) -> None:
    # Booking up to a whole window ahead, so that several bookings lie ahead of now.
    lim = dataclasses.replace(limits(shares={"index": 0.3, "acte": 0.6}), horizon_us=W)
    twin = Twin(store, lim)
    now = T0
    await twin.admit(now, "seed", 1, "")
    now += 3 * W  # the phantom and the seed are gone
    for n in range(6):
        await twin.admit(now, f"g{n}", 50 + n, ["index", "acte", ""][n % 3])
    core = budget.snapshot(twin.state, twin.lim, now)
    assert core.booked_requests >= 3  # the lane reserves may hold one back
    assert core.requests == 1
    assert core.lanes["acte"] == (0, 0)  # booked ahead: not in the window yet
    for offset in (0, 1, W // 12, W // 5, W // 2, W):
        await twin.compare_snapshots(now + offset)


@pytest.mark.parametrize("window_s", [1.0, 86_400.0])
async def test_the_learned_factor_and_its_ceiling_agree(
    store: RedisRateStore, window_s: float
) -> None:
    lim = Limits.of(Budget(rpm=12, tpm=1_000, window_s=window_s))
    w = lim.window_us
    twin = Twin(store, lim)
    now = T0
    # A cut at the full budget, a second one while climbing (a ceiling), then the climb:
    # fast to the knee, slow to the ceiling, fast again; then a 429 on the slow stretch.
    n = 0
    ceilings: list[int] = []
    for gap in (0, w // 3, 3 * w, 2 * w, 4 * w, 5 * w, 2 * w, 7 * w, 30 * w):
        # Traffic before each 429: the ceiling is the factor or what the window held.
        for k in range(gap // (w // 10)):
            await twin.admit(now + k * (w // 10), f"t{n}", 40, "")
            n += 1
        now += gap
        await twin.report(now, 0, True)
        ceilings.append(twin.state.ceiling_ppm)
        for k in range(0, 24 * 4):
            await twin.compare_snapshots(now + k * w // 4 + k)
    assert ceilings[-1] == 0  # the last 429 came after a full recovery
    assert len({c for c in ceilings if c > 0}) >= 3


async def test_oversized_and_daily_budget_agree(store: RedisRateStore) -> None:
    twin = Twin(store, limits(rpd=3))
    assert (await twin.admit(T0, "big", 5_000, ""))[0] == budget.TOO_LARGE
    kinds = [(await twin.admit(T0 + k * W, f"d{k}", 1, ""))[0] for k in range(5)]
    assert kinds[:3] == [budget.ADMIT] * 3
    assert kinds[3:] == [budget.DAY_EXHAUSTED] * 2
    await twin.compare_snapshots(T0 + 5 * W)


@pytest.mark.parametrize("seed", range(24))
async def test_random_scenarios_agree(store: RedisRateStore, seed: int) -> None:
    rng = random.Random(seed)
    shares = {"index": 0.3, "acte": 0.6} if seed % 2 else None
    headroom = rng.choice([0, 150])
    twin = Twin(store, limits(shares=shares, rpd=rng.choice([None, 40]), headroom=headroom))
    now = T0
    admitted: list[tuple[str, int, str]] = []
    for n in range(80):
        now += rng.choice([0, 1, 500, 20_000, 90_000, 400_000])
        roll = rng.random()
        if roll < 0.6:
            lane = rng.choice(["index", "acte", "other"])
            # One request, or a process's queue of waiters booked in one call.
            # Some grants carry the variance of their estimate (the fleet margin).
            batch = [
                (
                    f"g{n}.{k}" + rng.choice(["", "", "#2500", "#90000", "#1"]),
                    rng.choice([1, 50, 120, 300, 999, 1_001]),
                )
                for k in range(rng.choice([1, 1, 1, 2, 5]))
            ]
            kinds = await twin.admit_many(now, batch, lane)
            assert kinds[:-1] == [budget.ADMIT] * (len(kinds) - 1)  # stops at the first refusal
            admitted += [
                (gid, tokens, lane)
                for (gid, tokens), kind in zip(batch, kinds, strict=False)
                if kind == budget.ADMIT
            ]
        elif roll < 0.8 and admitted:
            gid, estimate, lane = rng.choice(admitted)
            await twin.settle(now, gid, estimate, rng.randrange(0, 2 * estimate + 2), lane)
        elif roll < 0.9 and admitted:
            await twin.release(now, *rng.choice(admitted))
        elif roll < 0.95:
            await twin.report(now, rng.choice([0, 100_000]), rng.random() < 0.5)
        else:
            await twin.compare_snapshots(now)
    await twin.compare_snapshots(now)


async def test_state_never_outlives_the_log(store: RedisRateStore) -> None:
    """The state counts the log's entries: were it left alone, those counts would stay."""
    state_key, log_key = model_keys("twin", "ttl")
    lim = limits()
    client = store.client
    # Long after the seed's phantom entries left: the admission creates the log.
    await store.call("ttl", lim, "admit", ["", "a", 10], now=T0)
    now = T0 + 2 * W
    await store.call("ttl", lim, "admit", ["", "only", 10], now=now)
    # Settling the log's only entry replaces it without emptying (and so dropping) the log.
    await store.call("ttl", lim, "settle", ["only", 10, 4, ""], now=now + 1_000)
    assert await client.zcard(log_key) == 1
    for step in range(1, 8):  # every 0.3 window: the log's TTL is refreshed every other call
        await store.call("ttl", lim, "admit", ["", f"g{step}", 10], now=now + step * 300_000)
        log_ms = await client.pttl(log_key)
        state_ms = await client.pttl(state_key)  # read second: a later clock, if anything
        assert 0 < state_ms <= log_ms, step  # the same millisecond at worst
