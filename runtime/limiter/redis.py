"""The fleet-wide ``RateStore``: every decision is one EVALSHA of ``scripts/limiter.lua``.

The script is loaded once with ``SCRIPT LOAD`` and loaded again when a restarted or
failed-over server answers ``NOSCRIPT``. Time comes from Redis ``TIME`` inside the
script, so the clocks of the workers never matter. All keys of one model share one hash
tag, ``{namespace:model}``, so a Redis Cluster keeps them on one shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from importlib import resources
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runtime.limiter.budget import Decision, Limits, Snapshot
from runtime.limiter.errors import StoreUnavailable

SCRIPT = resources.files("runtime.limiter").joinpath("scripts/limiter.lua").read_text()
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


def connect(url: str, timeout_s: float = 2.0) -> aioredis.Redis:
    """A client that fails fast: the limiter falls back rather than retrying blindly."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def _cancel_swallowed(before: int) -> None:
    """Re-raise a cancellation that the driver swallowed (it can while it connects)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


def _cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


@functools.lru_cache(maxsize=256)
def limits_argument(limits: Limits) -> bytes:
    """The limits as the script's one argument: fewer arguments, cheaper calls."""
    shares = ",".join(f"{lane}={ppm}" for lane, ppm in limits.shares)
    figures = (limits.window_us, limits.rpm, limits.tpm, limits.rpd, limits.horizon)
    return " ".join([*map(str, figures), shares]).encode()


@functools.lru_cache(maxsize=256)
def model_keys(namespace: str, model: str) -> tuple[str, ...]:
    tag = f"{{{namespace}:{model}}}"
    return (f"{tag}:state", f"{tag}:log", f"{tag}:grants", f"{tag}:days")


class RedisRateStore:
    """Admission state of every model, shared by the fleet through one Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        timeout_s: float = 2.0,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._clock = clock  # tests only: pass time in instead of reading Redis TIME
        self._sha: str | None = None

    @classmethod
    def from_url(cls, url: str, namespace: str, *, timeout_s: float = 2.0) -> RedisRateStore:
        return cls(connect(url, timeout_s), namespace, timeout_s=timeout_s)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def call(
        self, model: str, limits: Limits, op: str, args: Sequence[str | int], now: int | None = None
    ) -> list[object]:
        """Run one operation of the script; ``StoreUnavailable`` when Redis cannot answer."""
        if now is None and self._clock is not None:
            now = self._clock()
        argv: list[str | int | bytes] = [
            op,
            "" if now is None else now,
            limits_argument(limits),
            *args,
        ]
        keys = model_keys(self._namespace, model)
        before = _cancelling()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._sha is None:
                    self._sha = await self._client.script_load(SCRIPT)
                try:
                    result = await self._client.evalsha(self._sha, len(keys), *keys, *argv)
                except NoScriptError:
                    # A restarted or failed-over server forgot the script: load it once more.
                    self._sha = await self._client.script_load(SCRIPT)
                    result = await self._client.evalsha(self._sha, len(keys), *keys, *argv)
        except UNREACHABLE as exc:
            await self._drop_connections()
            _cancel_swallowed(before)
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc
        _cancel_swallowed(before)
        return list(result)

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]:
        args: list[str | int] = [lane]
        for grant_id, tokens in requests:
            args += (grant_id, tokens)
        # The script replies with integers: kind, value for each request decided, then now.
        *decided, now = cast(list[int], await self.call(model, limits, "admit", args))
        return [Decision(decided[i], decided[i + 1], now) for i in range(0, len(decided), 2)]

    async def settle(
        self, model: str, limits: Limits, grant_id: str, estimate: int, actual: int, lane: str
    ) -> int:
        result = await self.call(model, limits, "settle", [grant_id, estimate, actual, lane])
        return int(str(result[0]))

    async def release(self, model: str, limits: Limits, grant_id: str) -> bool:
        result = await self.call(model, limits, "release", [grant_id])
        return int(str(result[0])) == 1

    async def report(self, model: str, limits: Limits, retry_after_us: int, teach: bool) -> None:
        await self.call(model, limits, "report", [retry_after_us, "1" if teach else "0"])

    async def snapshot(self, model: str, limits: Limits) -> Snapshot:
        out = await self.call(model, limits, "snapshot", [])
        head = [int(str(x)) for x in out[:8]]
        now, requests, tokens, factor, pause, today, booked_requests, booked_tokens = head
        lanes: dict[str, tuple[int, int]] = {}
        rest = out[8:]
        for i in range(0, len(rest), 3):
            name = rest[i]
            lane = name.decode() if isinstance(name, bytes) else str(name)
            lanes[lane] = (int(str(rest[i + 1])), int(str(rest[i + 2])))
        return Snapshot(
            now,
            requests,
            tokens,
            factor,
            pause,
            today,
            dict(sorted(lanes.items())),
            booked_requests,
            booked_tokens,
        )

    async def _drop_connections(self) -> None:
        # After a crash every pooled connection is dead: start afresh when Redis is back.
        with contextlib.suppress(Exception):
            await self._client.connection_pool.disconnect()

    async def ping(self) -> None:
        before = _cancelling()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc
        finally:
            _cancel_swallowed(before)

    async def aclose(self) -> None:
        await self._client.aclose()
