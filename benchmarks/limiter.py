"""Limiter benchmark: admission cost against the physical limit of one Redis round trip.

``run(quick)`` returns a Markdown section; ``python -m benchmarks.limiter`` prints it,
starting a throw-away Redis unless ``REDIS_URL`` is set.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import redis.asyncio as aioredis

from runtime.limiter import Budget, create_limiter
from runtime.limiter.budget import Limits
from runtime.limiter.redis import SCRIPT, connect, limits_argument, model_keys
from runtime.services import LocalRedis

# A budget no benchmark reaches: what is measured is the cost of admitting, not waiting.
UNBOUNDED = Budget(rpm=10_000_000, tpm=100_000_000, window_s=1.0)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(url: str, n: int) -> dict[str, float]:
    """Admission latency beside PING, and beside the same script call made bare.

    ``bare`` is the script's EVALSHA sent straight from redis-py with the arguments the
    limiter sends, and ``floor`` an EVALSHA of ``return 1`` with those arguments: the
    steps between them show where an admission's time goes (the script's own work, and
    the limiter's Python around the call).
    """
    limiter = await create_limiter(url, UNBOUNDED, namespace="bench-latency")
    client = connect(url)  # configured as the limiter's own client
    default = aioredis.from_url(url)  # redis-py as it comes (a 5 s socket timeout)
    keys = model_keys("bench-bare", "flash")
    floor_sha = await client.script_load("return 1")
    script_sha = await client.script_load(SCRIPT)
    samples: dict[str, list[float]] = {
        "admit": [], "ping": [], "bare": [], "floor": [], "default": [],
    }  # fmt: skip

    async def timed(name: str, call: Awaitable[object], record: bool) -> None:
        t0 = time.perf_counter()
        await call
        if record:
            samples[name].append(time.perf_counter() - t0)

    for i in range(n + 200):  # the first 200 warm up (and let the start-up phantom pass)
        record = i >= 200
        t0 = time.perf_counter()
        async with limiter.acquire(10, model="flash"):
            t1 = time.perf_counter()
        if record:
            samples["admit"].append(t1 - t0)
        await timed("ping", client.ping(), record)
        await timed("default", default.ping(), record)
        args = ("admit", "", limits_argument(Limits.of(UNBOUNDED)), "", f"b{i}", 10)
        await timed("bare", client.evalsha(script_sha, len(keys), *keys, *args), record)
        await timed("floor", client.evalsha(floor_sha, len(keys), *keys, *args), record)
    await client.aclose()
    await default.aclose()
    await limiter.aclose()
    return {
        f"{name}_{label}": _percentile(values, q) * 1e6
        for name, values in samples.items()
        for label, q in (("p50", 0.5), ("p99", 0.99))
    }


async def _throughput(url: str, mode: str, concurrency: int, seconds: float) -> int:
    limiter = await create_limiter(url, UNBOUNDED, namespace="bench-rate", max_inflight=10_000)
    client = connect(url)  # configured as the limiter's own client
    done = 0
    await asyncio.sleep(0.05)
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            if mode == "ping":
                await client.ping()
            else:
                async with limiter.acquire(10, model="flash"):
                    pass
            done += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    await client.aclose()
    await limiter.aclose()
    return done


async def _saturated(url: str, waiters: int, seconds: float) -> int:
    budget = Budget(rpm=400, tpm=4_000_000, window_s=1.0)
    limiter = await create_limiter(url, budget, namespace="bench-sat", max_inflight=waiters)
    stop = time.monotonic() + seconds
    admitted = 0

    async def waiter() -> None:
        nonlocal admitted
        while time.monotonic() < stop:
            async with limiter.acquire(1_000, model="flash") as grant:
                await asyncio.sleep(0.005)
                await grant.settle(900)  # a real settle call per admission
            admitted += 1

    await asyncio.gather(*(waiter() for _ in range(waiters)))
    await limiter.aclose()
    return admitted


def _worker(job: tuple[str, str, int, float]) -> int:
    url, mode, amount, seconds = job
    if mode == "saturated":
        return asyncio.run(_saturated(url, amount, seconds))
    return asyncio.run(_throughput(url, mode, amount, seconds))


def _fleet(url: str, mode: str, processes: int, amount: int, seconds: float) -> int:
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        return sum(pool.map(_worker, [(url, mode, amount, seconds)] * processes))


# Commands the script runs inside Redis; INFO counts them as well as the EVALSHA.
_SCRIPT_INTERNAL = {
    "time", "get", "set", "del", "zadd", "zrangebyscore", "zremrangebyrank", "zrange",
    "zscore", "zrem", "pexpire",
}  # fmt: skip


async def _commands(url: str) -> tuple[int, int]:
    """Commands sent by clients, and commands executed including the scripts' own."""
    client = aioredis.from_url(url)
    stats = await client.info("commandstats")
    await client.aclose()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    sent = sum(n for name, n in calls.items() if name not in _SCRIPT_INTERNAL)
    return sent, sum(calls.values())


def _commands_per_admission(url: str, waiters: int, seconds: float) -> tuple[float, float, int]:
    sent0, all0 = asyncio.run(_commands(url))
    admitted = _fleet(url, "saturated", 4, waiters, seconds)
    sent1, all1 = asyncio.run(_commands(url))
    per = max(1, admitted)
    return (sent1 - sent0 - 1) / per, (all1 - all0 - 1) / per, admitted


def run(quick: bool = False) -> str:
    """Measure against ``REDIS_URL`` (or a local Redis) and return a Markdown section."""
    url = os.environ.get("REDIS_URL")
    if url is None:
        with tempfile.TemporaryDirectory() as directory:
            server = LocalRedis(Path(directory))
            server.start()
            try:
                return _measure(server.url, quick)
            finally:
                server.stop()
    return _measure(url, quick)


def _measure(url: str, quick: bool) -> str:
    n, seconds, repeats = (500, 1.0, 1) if quick else (3_000, 3.0, 3)
    latency = [asyncio.run(_latency(url, n)) for _ in range(repeats)]
    lat = {k: statistics.median(r[k] for r in latency) for k in latency[0]}
    rates: dict[tuple[str, int], float] = {}
    for processes in (1, 4):
        for mode in ("admit", "ping"):
            runs = [_fleet(url, mode, processes, 32, seconds) / seconds for _ in range(repeats)]
            rates[(mode, processes)] = statistics.median(runs)
    sat_s = 2.0 if quick else 4.0
    cpa30, ex30, n30 = _commands_per_admission(url, 30, sat_s)
    cpa300, ex300, n300 = _commands_per_admission(url, 300, sat_s)
    lines = [
        "## Limiter",
        "",
        f"Local Redis, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; medians of "
        f"{repeats} run(s). One admission = one EVALSHA (plus one per settle that differs).",
        "PING, the bare script and `return 1` go through a client configured as the "
        "limiter's own (`runtime.limiter.redis.connect`: commands packed by hiredis); the "
        "breakdown's first row is a PING from redis-py with its defaults.",
        "",
        "| measure | limiter | PING | ratio |",
        "|---|---|---|---|",
        f"| latency p50 (µs) | {lat['admit_p50']:.0f} | {lat['ping_p50']:.0f} | "
        f"{lat['admit_p50'] / lat['ping_p50']:.2f}x |",
        f"| latency p99 (µs) | {lat['admit_p99']:.0f} | {lat['ping_p99']:.0f} | "
        f"{lat['admit_p99'] / lat['ping_p99']:.2f}x |",
    ]
    steps = [
        ("PING from redis-py with its default settings (for reference)", "default"),
        ("PING", "ping"),
        ("EVALSHA of `return 1`, same keys and arguments", "floor"),
        ("the limiter's script, bare EVALSHA from redis-py", "bare"),
        ("`limiter.acquire` (enter and leave)", "admit"),
    ]
    breakdown = [
        "",
        "Where an admission's time goes (p50, same loop, same client):",
        "",
        "| call | p50 (µs) | vs PING |",
        "|---|---:|---:|",
        *(
            f"| {label} | {lat[name + '_p50']:.0f} | {lat[name + '_p50'] / lat['ping_p50']:.2f}x |"
            for label, name in steps
        ),
    ]
    for processes in (1, 4):
        admit, ping = rates[("admit", processes)], rates[("ping", processes)]
        lines.append(
            f"| per second, {processes} process(es) x 32 callers | {admit:,.0f} | {ping:,.0f} | "
            f"{admit / ping:.2f}x |"
        )
    lines += breakdown
    lines += [
        "",
        "Redis commands per admission at saturation (4 processes, budget 400 per 1 s window,"
        " every admission settled with a different figure):",
        "",
        "| waiters per process | admissions | commands sent per admission | "
        "executed, script internals included |",
        "|---|---|---|---|",
        f"| 30 | {n30} | {cpa30:.2f} | {ex30:.1f} |",
        f"| 300 | {n300} | {cpa300:.2f} | {ex300:.1f} |",
        "",
        _verdicts(lat, rates, (cpa30, cpa300)),
        "",
    ]
    return "\n".join(lines)


def _verdicts(
    lat: dict[str, float], rates: dict[tuple[str, int], float], per_admission: tuple[float, float]
) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    latency = lat["admit_p50"] / lat["ping_p50"]
    rate = min(rates[("admit", n)] / rates[("ping", n)] for n in (1, 4))
    spread = abs(per_admission[0] - per_admission[1])
    return (
        f"Targets: latency p50 **{latency:.2f}x** PING (1.5x: {verdict(latency <= 1.5)}); "
        f"admissions per second at least **{rate:.2f}x** PINGs (0.4x: {verdict(rate >= 0.4)}); "
        f"commands sent per admission **{max(per_admission):.2f}** at most, "
        f"{spread:.2f} apart for 30 and 300 waiters "
        f"(at most 3, the same: {verdict(max(per_admission) <= 3 and spread <= 0.25)})."
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
