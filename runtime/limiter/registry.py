"""Which workers are alive, by type: heartbeats every 10 s, dead after 30 s of silence.

The limiter reads the live count every second (a cheap read, apart from the heartbeat)
and, while Redis is unreachable, divides the budget by the largest count it read in the
30 s before it lost Redis. The monitor shows the fleet. Heartbeat times are Redis
``TIME``, so worker clocks never matter.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from runtime.limiter.errors import StoreUnavailable
from runtime.limiter.redis import UNREACHABLE

HEARTBEAT_S = 10.0
DEAD_AFTER_S = 30.0
LIVE_REFRESH_S = 1.0  # how often the limiter reads the live count


class WorkerRegistry(Protocol):
    """Workers announce themselves and keep announcing; silence means dead."""

    async def register(self, worker_id: str, worker_type: str | Sequence[str]) -> None: ...

    async def deregister(self, worker_id: str) -> None: ...

    async def live_workers(self) -> dict[str, list[str]]: ...


def _alive(entries: dict[str, tuple[str, float]], now: float) -> dict[str, list[str]]:
    by_type: dict[str, list[str]] = {}
    for worker_id, (types, seen) in sorted(entries.items()):
        if seen > now - DEAD_AFTER_S:
            for worker_type in types.split(","):
                by_type.setdefault(worker_type, []).append(worker_id)
    return by_type


def _types(worker_type: str | Sequence[str]) -> str:
    """A worker serving several types counts under each of them."""
    return worker_type if isinstance(worker_type, str) else ",".join(sorted(worker_type))


def live_count(workers: dict[str, list[str]]) -> int:
    return len({worker_id for ids in workers.values() for worker_id in ids})


class LiveCounts:
    """The live counts read over the last ``memory_s`` seconds before the latest reading.

    A worker seen within that span may still be alive (it is declared dead only after
    ``DEAD_AFTER_S`` of silence), so the fallback divides by the largest of them rather
    than by the latest one. While the registry cannot be read nothing is added and
    nothing is forgotten: the divisor stays what it was when Redis went away.
    """

    def __init__(self, memory_s: float = DEAD_AFTER_S) -> None:
        self._memory_s = memory_s
        self._readings: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        self._readings.append((now, max(1, count)))
        while self._readings[0][0] < now - self._memory_s:
            self._readings.popleft()

    @property
    def latest(self) -> int:
        return self._readings[-1][1] if self._readings else 1

    @property
    def largest(self) -> int:
        return max((count for _, count in self._readings), default=1)


class MemoryWorkerRegistry:
    """The registry of a single process (and of the tests, with a fake clock)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[str, float]] = {}

    async def register(self, worker_id: str, worker_type: str | Sequence[str]) -> None:
        self._entries[worker_id] = (_types(worker_type), self._clock())

    async def deregister(self, worker_id: str) -> None:
        self._entries.pop(worker_id, None)

    async def live_workers(self) -> dict[str, list[str]]:
        now = self._clock()
        self._entries = {k: v for k, v in self._entries.items() if v[1] > now - DEAD_AFTER_S}
        return _alive(self._entries, now)


class RedisWorkerRegistry:
    """One hash per namespace: worker id -> ``type|last heartbeat (Redis time)``."""

    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self._client = client
        self._key = f"{{{namespace}}}:workers"

    async def _now(self) -> float:
        seconds, micros = await self._client.time()
        return float(seconds) + float(micros) / 1e6

    async def register(self, worker_id: str, worker_type: str | Sequence[str]) -> None:
        """Announce (or re-announce, as a heartbeat) a worker of one type or several."""
        try:
            now = await self._now()
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._key, worker_id, f"{_types(worker_type)}|{now:.6f}")
                pipe.expire(self._key, int(2 * DEAD_AFTER_S))
                await pipe.execute()
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc

    async def deregister(self, worker_id: str) -> None:
        try:
            await self._client.hdel(self._key, worker_id)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc

    async def live_workers(self) -> dict[str, list[str]]:
        """Live workers by type; the dead ones are removed on the way."""
        try:
            now = await self._now()
            raw = await self._client.hgetall(self._key)
            entries: dict[str, tuple[str, float]] = {}
            for key, value in raw.items():
                text = value.decode() if isinstance(value, bytes) else str(value)
                worker_type, _, seen = text.rpartition("|")
                name = key.decode() if isinstance(key, bytes) else str(key)
                entries[name] = (worker_type, float(seen))
            dead = [k for k, (_, seen) in entries.items() if seen <= now - DEAD_AFTER_S]
            if dead:
                await self._client.hdel(self._key, *dead)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc
        return _alive(entries, now)
