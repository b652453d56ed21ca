"""Quota utilisation and 429s of three admission policies on the same saturated workload.

Three worker processes, each with a few concurrent callers, drive the real google-genai
SDK against the emulator (strict rolling window, quota = the budget), with random token
sizes, for a few windows. The policies:

- ``ours``: the fleet limiter (``create_limiter`` on Redis), budget window widened by the
  arrival skew as the worker does;
- ``per-process``: no coordination, each process runs its own exact rolling-window
  limiter over budget / N (the common workaround);
- ``original``: the original system's scheme, fixed-window counters in Redis: GET both
  counters and compare to the limits, call, then INCR / INCRBY after the call; every
  process resets the counters with its own timer every window.

A caller that gets a 429 under ``ours`` reports it to the limiter and asks again; under
the two others it sleeps the server's ``retryDelay`` and tries again. The emulator records
the arrival of every generate call; the figures are per tumbling window of the quota's
length, after a warm-up window. Run alone with ``python -m benchmarks.policies``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from runtime.emulator import Decision, Emulator, EmulatorConfig
from runtime.services import local_services

MODEL = "gemini-2.5-flash"
POLICIES = ("ours", "per-process", "original")
LABELS = {
    "ours": "fleet limiter (Redis, paced, exact rolling window)",
    "per-process": "per-process limiter, budget / N each, no coordination",
    "original": "original: fixed-window counters, check, call, record after",
}
_RETRY_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")


@dataclass(frozen=True)
class Workload:
    """The saturated workload every policy runs."""

    processes: int = 3
    callers: int = 8  # concurrent callers per process
    rpm: int = 60  # requests per window, the emulator's quota and the budget
    tpm: int = 75_000  # tokens per window
    window_s: float = 4.0
    skew_s: float = 0.1  # arrival spread the fleet limiter's window is widened by
    min_tokens: int = 100
    max_tokens: int = 1_900
    latency_ms: float = 500.0  # emulated model latency
    warmup_windows: int = 1
    windows: int = 4  # measured windows
    original_poll_s: float = 0.5  # how often the original scheme re-checks when full

    @property
    def duration_s(self) -> float:
        return (self.warmup_windows + self.windows) * self.window_s


@dataclass
class CallerCounts:
    """What one process saw."""

    calls: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0


@dataclass
class PolicyResult:
    policy: str
    per_window: list[int]
    tokens_per_window: list[int]
    arrivals: int
    rejected: int
    client: CallerCounts = field(default_factory=CallerCounts)
    # Every call the emulator judged, (seconds since the start, tokens, admitted).
    events: list[tuple[float, int, bool]] = field(default_factory=list)


# --- the admission policies, as each worker process runs them -------------------------


class RateLimited(Exception):
    """The server answered 429."""

    def __init__(self, delay_s: float | None, quota_id: str | None) -> None:
        super().__init__("429")
        self.delay_s = delay_s
        self.quota_id = quota_id


Call = Callable[[int], Awaitable[int]]  # tokens -> tokens the server reports


class Policy:
    """How one process admits a call; ``run`` raises ``RateLimited`` on a 429."""

    async def run(self, tokens: int, call: Call) -> None:
        raise NotImplementedError

    async def after_429(self, exc: RateLimited) -> None:
        await asyncio.sleep(exc.delay_s if exc.delay_s is not None else 1.0)

    async def aclose(self) -> None:
        return None


class FleetPolicy(Policy):
    """Ours: ``runtime.limiter`` on Redis."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter

    async def run(self, tokens: int, call: Call) -> None:
        async with self.limiter.acquire(tokens=tokens, model=MODEL, lane="bench") as grant:
            try:
                actual = await call(tokens)
            except RateLimited as exc:
                await grant.settle(0)
                await self.limiter.report_rate_limited(
                    model=MODEL, retry_after_s=exc.delay_s, quota_id=exc.quota_id
                )
                raise
            await grant.settle(actual)

    async def after_429(self, exc: RateLimited) -> None:
        return None  # the limiter's fleet-wide pause does the waiting

    async def aclose(self) -> None:
        await self.limiter.aclose()


class PerProcessPolicy(Policy):
    """An exact rolling-window log in this process only, over budget / N."""

    def __init__(self, rpm: int, tpm: int, window_s: float) -> None:
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _wait_s(self, tokens: int) -> float:
        now = time.monotonic()
        while self._log and self._log[0][0] <= now - self.window_s:
            self._tokens -= self._log.popleft()[1]
        if len(self._log) + 1 <= self.rpm and self._tokens + tokens <= self.tpm:
            self._log.append((now, tokens))
            self._tokens += tokens
            return 0.0
        # The earliest time one more entry has left: a retry point, not a promise.
        return max(0.001, self._log[0][0] + self.window_s - now)

    async def run(self, tokens: int, call: Call) -> None:
        wait = self._wait_s(tokens)
        while wait > 0:
            await asyncio.sleep(wait)
            wait = self._wait_s(tokens)
        await call(tokens)


class OriginalPolicy(Policy):
    """Fixed-window counters in Redis: check (GET), call, record (INCR/INCRBY) after."""

    def __init__(self, client: Any, prefix: str, rpm: int, tpm: int, poll_s: float) -> None:
        self.client, self.rpm, self.tpm, self.poll_s = client, rpm, tpm, poll_s
        self.rpm_key, self.tpm_key = f"{prefix}:rpm:current", f"{prefix}:tpm:current"

    async def run(self, tokens: int, call: Call) -> None:
        while True:
            used_requests, used_tokens = await self.client.mget(self.rpm_key, self.tpm_key)
            if (
                int(used_requests or 0) + 1 <= self.rpm
                and int(used_tokens or 0) + tokens <= self.tpm
            ):
                break
            await asyncio.sleep(self.poll_s)
        actual = await call(tokens)
        await self.client.incr(self.rpm_key)
        await self.client.incrby(self.tpm_key, actual)

    async def reset_forever(self, window_s: float, phase_s: float) -> None:
        """Every process's own timer: counters back to zero every window, from its start."""
        await asyncio.sleep(phase_s)
        while True:
            await self.client.mset({self.rpm_key: 0, self.tpm_key: 0})
            await asyncio.sleep(window_s)

    async def aclose(self) -> None:
        await self.client.aclose()


# --- one worker process -------------------------------------------------------------------


def _retry_info(details: Any) -> tuple[float | None, str | None]:
    delay: float | None = None
    quota_id: str | None = None
    error = details.get("error", {}) if isinstance(details, dict) else {}
    for detail in error.get("details", []) if isinstance(error, dict) else []:
        kind = str(detail.get("@type", "")) if isinstance(detail, dict) else ""
        if kind.endswith("RetryInfo"):
            match = _RETRY_DELAY.match(str(detail.get("retryDelay", "")))
            delay = float(match.group(1)) if match else None
        elif kind.endswith("QuotaFailure"):
            for violation in detail.get("violations", []) or []:
                if isinstance(violation, dict) and violation.get("quotaId"):
                    quota_id = str(violation["quotaId"])
    return delay, quota_id


@asynccontextmanager
async def _sdk(base_url: str) -> AsyncIterator[Call]:
    """The raw google-genai SDK on its own aiohttp session, its retries off."""
    import aiohttp
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    options = types.HttpOptions(
        base_url=base_url,
        api_version="v1beta",
        timeout=60_000,
        retry_options=types.HttpRetryOptions(attempts=1),
        aiohttp_client=session,
    )
    client = genai.Client(api_key="bench-key", http_options=options)
    filler = "registre foncier " * 1_000

    async def call(tokens: int) -> int:
        # The emulator counts one token per 4 characters of prompt text.
        text = ("Resumez. " + filler)[: tokens * 4]
        try:
            response = await client.aio.models.generate_content(model=MODEL, contents=text)
        except genai_errors.APIError as exc:
            if exc.code == 429:
                raise RateLimited(*_retry_info(exc.details)) from exc
            raise
        usage = response.usage_metadata
        return int(usage.prompt_token_count or tokens) if usage else tokens

    try:
        yield call
    finally:
        await client.aio.aclose()
        await session.close()


async def _make_policy(
    name: str, redis_url: str, namespace: str, load: Workload, rng: random.Random
) -> tuple[Policy, list[Awaitable[None]]]:
    if name == "ours":
        from runtime.limiter import Budget, create_limiter

        budget = Budget(rpm=load.rpm, tpm=load.tpm, window_s=load.window_s + load.skew_s)
        limiter = await create_limiter(redis_url, budget, namespace=namespace, max_inflight=64)
        return FleetPolicy(limiter), []
    if name == "per-process":
        share_rpm, share_tpm = load.rpm // load.processes, load.tpm // load.processes
        return PerProcessPolicy(share_rpm, share_tpm, load.window_s + load.skew_s), []
    import redis.asyncio as aioredis

    policy = OriginalPolicy(
        aioredis.from_url(redis_url), namespace, load.rpm, load.tpm, load.original_poll_s
    )
    # Workers start at unrelated times, so their timers are out of phase.
    return policy, [policy.reset_forever(load.window_s, rng.uniform(0, load.window_s))]


async def _work(
    name: str, base_url: str, redis_url: str, namespace: str, load: Workload,
    seed: int, ready: Event, go: Event,
) -> CallerCounts:  # fmt: skip
    counts = CallerCounts()
    rng = random.Random(seed)
    policy, side = await _make_policy(name, redis_url, namespace, load, rng)
    async with _sdk(base_url) as call:
        ready.set()
        await asyncio.to_thread(go.wait)
        stop = time.monotonic() + load.duration_s

        async def caller() -> None:
            while time.monotonic() < stop:
                tokens = rng.randint(load.min_tokens, load.max_tokens)
                while time.monotonic() < stop:
                    counts.calls += 1
                    try:
                        await policy.run(tokens, call)
                    except RateLimited as exc:
                        counts.rate_limited += 1
                        await policy.after_429(exc)
                        continue
                    except Exception:
                        counts.errors += 1
                    else:
                        counts.ok += 1
                    break

        side_tasks = [asyncio.ensure_future(task) for task in side]
        try:
            async with asyncio.timeout(load.duration_s + 2 * load.window_s):
                await asyncio.gather(*(caller() for _ in range(load.callers)))
        except TimeoutError:
            pass  # callers still waiting past the end: the run is over anyway
        finally:
            for task in side_tasks:
                task.cancel()
            await asyncio.gather(*side_tasks, return_exceptions=True)
            await policy.aclose()
    return counts


def _child(
    name: str, base_url: str, redis_url: str, namespace: str, load: Workload,
    seed: int, ready: Event, go: Event, results: Queue[tuple[int, int, int, int]],
) -> None:  # fmt: skip
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    counts = asyncio.run(_work(name, base_url, redis_url, namespace, load, seed, ready, go))
    results.put((counts.calls, counts.ok, counts.rate_limited, counts.errors))


# --- the parent: emulator, processes, windows ------------------------------------------


class ArrivalLog:
    """Every generate call the emulator's quota judged: (time, tokens, admitted)."""

    def __init__(self, emulator: Emulator) -> None:
        self.events: list[tuple[float, int, bool]] = []
        quota = emulator.service.quota(MODEL)
        admit = quota.admit

        def recorded(now: float, tokens: int) -> Decision:
            decision = admit(now, tokens)
            self.events.append((now, tokens, decision.admitted))
            return decision

        quota.admit = recorded  # type: ignore[method-assign]


async def run_policy(
    name: str, redis_url: str, load: Workload, cut_at_s: float | None = None
) -> PolicyResult:
    """Run one policy; with ``cut_at_s`` the quota is halved that long after the start."""
    config = EmulatorConfig(
        rpm=load.rpm, tpm=load.tpm, window_s=load.window_s, latency_ms=load.latency_ms, seed=7
    )
    context = multiprocessing.get_context("spawn")
    namespace = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    async with Emulator(config) as emulator:
        log = ArrivalLog(emulator)
        go = context.Event()
        readies = [context.Event() for _ in range(load.processes)]
        results: Queue[tuple[int, int, int, int]] = context.Queue()
        processes = [
            context.Process(
                target=_child,
                args=(
                    name,
                    emulator.base_url,
                    redis_url,
                    namespace,
                    load,
                    1000 + n,
                    readies[n],
                    go,
                    results,
                ),
            )
            for n in range(load.processes)
        ]
        for process in processes:
            process.start()
        try:
            for ready in readies:
                if not await asyncio.to_thread(ready.wait, 120):
                    raise RuntimeError("a benchmark process did not start")
            started = time.monotonic()
            go.set()
            if cut_at_s is not None:
                halve = (None, load.rpm // 2, load.tpm // 2)
                asyncio.get_running_loop().call_later(cut_at_s, emulator.set_quota, *halve)
            counts = CallerCounts()
            for _ in processes:
                calls, ok, limited, errors = await asyncio.to_thread(results.get, True, 300)
                counts.calls += calls
                counts.ok += ok
                counts.rate_limited += limited
                counts.errors += errors
        finally:
            for process in processes:
                await asyncio.to_thread(process.join, 30)
                if process.is_alive():
                    process.kill()
    per_window: list[int] = []
    tokens_per_window: list[int] = []
    for k in range(load.warmup_windows, load.warmup_windows + load.windows):
        low, high = started + k * load.window_s, started + (k + 1) * load.window_s
        inside = [(tokens, ok) for at, tokens, ok in log.events if low <= at < high and ok]
        per_window.append(len(inside))
        tokens_per_window.append(sum(tokens for tokens, _ in inside))
    return PolicyResult(
        policy=name,
        per_window=per_window,
        tokens_per_window=tokens_per_window,
        arrivals=len(log.events),
        rejected=sum(1 for _, _, ok in log.events if not ok),
        client=counts,
        events=[(at - started, tokens, ok) for at, tokens, ok in log.events],
    )


def measure(redis_url: str, load: Workload) -> list[PolicyResult]:
    return [asyncio.run(run_policy(name, redis_url, load)) for name in POLICIES]


def _table(load: Workload, results: list[PolicyResult]) -> list[str]:
    lines = [
        "| policy | requests per window (median) | utilisation, requests | "
        "utilisation, tokens (median) | windows (requests) | calls arrived / admitted, "
        "whole run | 429s | 429 rate |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for result in results:
        requests = statistics.median(result.per_window)
        tokens = statistics.median(result.tokens_per_window)
        rate = result.rejected / max(1, result.arrivals)
        lines.append(
            f"| {LABELS[result.policy]} | {requests:g} / {load.rpm} | "
            f"{100 * requests / load.rpm:.1f} % | {100 * tokens / load.tpm:.1f} % | "
            f"{', '.join(str(n) for n in result.per_window)} | {result.arrivals:,} / "
            f"{result.arrivals - result.rejected:,} | {result.rejected:,} | "
            f"{100 * rate:.1f} % |"
        )
    return lines


def run(quick: bool = False) -> str:
    """Measure the three policies and return the Markdown section for docs/benchmarks.md."""
    load = Workload(windows=4) if quick else Workload(windows=10)
    with local_services(os.environ.get("REDIS_URL"), "unused", with_redis=True) as urls:
        assert urls.redis_url is not None
        results = measure(urls.redis_url, load)
    ours = results[0]
    ours_util = statistics.median(ours.per_window) / load.rpm
    verdict = "meets" if ours_util >= 0.95 and ours.rejected == 0 else "misses"
    lines = [
        "## Admission policies: quota utilisation and 429s",
        "",
        f"The same saturated workload under each policy, one after the other: "
        f"{load.processes} worker processes x {load.callers} concurrent callers, each call a "
        f"text prompt of {load.min_tokens:,}-{load.max_tokens:,} tokens (uniform), through the "
        f"real google-genai SDK (own aiohttp session, SDK retries off) to the emulator. "
        f"Emulator quota = budget = {load.rpm} requests and {load.tpm:,} input tokens per "
        f"strict rolling {load.window_s:g} s window; it counts a call when it arrives, "
        f"rejected calls included; model latency {load.latency_ms:g} ms. "
        f"The fleet limiter's window is widened by a {load.skew_s:g} s arrival skew "
        f"(`Budget(rpm, tpm, window_s + skew)`, so its ceiling is "
        f"{100 * load.window_s / (load.window_s + load.skew_s):.1f} % of the quota); the "
        f"per-process limiter gets the same widened window and {load.rpm // load.processes} "
        f"requests / {load.tpm // load.processes:,} tokens per process; in the original "
        f"scheme each process's reset timer starts at a random point of the window, and a "
        f"full counter is re-checked every {load.original_poll_s:g} s; both honour "
        f"`retryDelay` after a 429.",
        "",
        f"Requests the emulator admitted per tumbling {load.window_s:g} s window, over "
        f"{load.windows} windows after {load.warmup_windows} warm-up window(s); utilisation "
        f"is the median window against the budget. 429s and their rate (429s / calls that "
        f"arrived) cover the whole run, warm-up included.",
        "",
        *_table(load, results),
        "",
        "What each scheme risks: the per-process limiter admits each process's share as "
        "soon as it is free, unpaced, so bursts from the processes can reach the server "
        "together, and a share left unused by one process is lost to the others. The "
        "original scheme raises its counters only after a call returns and every process "
        "resets them on its own timer, so after each reset every caller passes the check at "
        "once; the server counts rejected calls against the quota, so callers that keep "
        "retrying keep the window full.",
        "",
        f"Fleet limiter: **{100 * ours_util:.1f} %** of the request budget with "
        f"**{ours.rejected}** 429s ({verdict} the target of >= 95 % with zero 429s).",
        "",
    ]
    errors = sum(r.client.errors for r in results)
    if errors:
        lines += [f"Calls that failed other than with a 429, all policies: {errors}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
