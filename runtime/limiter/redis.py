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
import struct
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from runtime.limiter.budget import Decision, Limits, Snapshot
from runtime.limiter.errors import StoreUnavailable

SCRIPT = resources.files("runtime.limiter").joinpath("scripts/limiter.lua").read_text()
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


class _PackedInC:
    """Packs commands with hiredis, in C.

    redis-py's asyncio connections pack every argument in Python; an admission sends a
    dozen of them, and packing them one by one cost about a tenth of a PING's time.
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # a command name may hold several words: "SCRIPT LOAD"
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        # hiredis's stub types the argument as a 1-tuple; it takes a tuple of any length.
        return [hiredis.pack_command(cast(Any, args))]


class _TcpConnection(_PackedInC, Connection):
    pass


class _TlsConnection(_PackedInC, SSLConnection):
    pass


class _UnixConnection(_PackedInC, UnixDomainSocketConnection):
    pass


_CONNECTIONS: dict[str, type[AbstractConnection]] = {
    "redis": _TcpConnection,
    "rediss": _TlsConnection,
    "unix": _UnixConnection,
}


def connect(url: str, timeout_s: float = 2.0) -> aioredis.Redis:
    """A client that fails fast: the limiter falls back rather than retrying blindly.

    Every send and read gives up after ``timeout_s``, and a store call as a whole too
    (``Deadlines``). Without the socket timeout, admissions measured about 45 µs faster
    (redis-py enforces it with ``asyncio.wait_for``, a task per send on Python 3.11), but
    the fleet's retries after a burst of 429s against a budget far above the quota came
    out more synchronised and ran out of attempts in three runs out of four
    (``test_without_the_limiter_the_emulator_enforces_and_calls_still_complete``); it
    stays until that is understood.
    """
    extra: dict[str, Any] = {}
    connection_class = _CONNECTIONS.get(urlsplit(url).scheme)
    if connection_class is not None:
        extra["connection_class"] = connection_class
    return aioredis.Redis.from_url(
        url,
        **extra,
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


class Deadlines:
    """Bounds the calls of one store with one watchdog task instead of a timer per call.

    ``asyncio.timeout`` arms and disarms a timer handle on every call, a measurable part
    of an admission. Here a call notes when it started; a task that wakes every quarter
    of the timeout, while calls are in flight, cancels those that overran. The call
    then reports a timeout (after 1 to 1.25 times ``timeout_s``); a cancellation from
    elsewhere passes through as it came.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._started: dict[asyncio.Task[Any], float] = {}
        self._overran: set[asyncio.Task[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    def enter(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None, "a store call runs in a task"
        self._started[task] = time.monotonic()
        if self._watch is None and not self._closed:
            self._watch = asyncio.ensure_future(self._watchdog())
        return task

    def overran(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """Whether a cancellation came from the watchdog alone (it is then undone)."""
        if task not in self._overran:
            return False
        self._overran.discard(task)
        return task.uncancel() <= cancelling

    def leave(self, task: asyncio.Task[Any]) -> None:
        del self._started[task]
        if task in self._overran:  # the call ended before the cancellation reached it
            self._overran.discard(task)
            task.uncancel()

    async def _watchdog(self) -> None:
        try:
            while self._started:
                await asyncio.sleep(self.timeout_s / 4)
                overdue = time.monotonic() - self.timeout_s
                for task, started in list(self._started.items()):
                    if started <= overdue and task not in self._overran:
                        self._overran.add(task)
                        task.cancel()
        finally:
            self._watch = None

    def close(self) -> None:
        """No watchdog from now on (a call after this fails on the closed client anyway)."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()


_ARGUMENTS: dict[int, tuple[Limits, bytes]] = {}


def limits_argument(limits: Limits) -> bytes:
    """The limits as the script's one argument: seven big-endian int64, then the shares.

    Binary figures cost the script one ``struct.unpack`` instead of a parse per figure.
    Cached by identity: the limiter keeps one ``Limits`` per model, and a lookup by id
    is cheaper than hashing the dataclass on every admission.
    """
    cached = _ARGUMENTS.get(id(limits))
    if cached is not None and cached[0] is limits:
        return cached[1]
    shares = ",".join(f"{lane}={ppm}" for lane, ppm in limits.shares)
    figures = (
        limits.window_us,
        limits.rpm,
        limits.tpm,
        limits.rpd,
        limits.horizon,
        limits.headroom,
        limits.z_milli,
    )
    argument = struct.pack(">7q", *figures) + shares.encode()
    if len(_ARGUMENTS) >= 256:
        _ARGUMENTS.clear()
    _ARGUMENTS[id(limits)] = (limits, argument)
    return argument


@functools.lru_cache(maxsize=256)
def model_keys(namespace: str, model: str) -> tuple[str, ...]:
    tag = f"{{{namespace}:{model}}}"
    return (f"{tag}:admission", f"{tag}:bookings")


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
        self._deadlines = Deadlines(timeout_s)
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
        argv = (op, "" if now is None else now, limits_argument(limits), *args)
        keys = model_keys(self._namespace, model)
        task = self._deadlines.enter()
        before = task.cancelling()
        try:
            if self._sha is None:
                self._sha = await self._client.script_load(SCRIPT)
            try:
                result = await self._client.evalsha(self._sha, len(keys), *keys, *argv)
            except NoScriptError:
                # A restarted or failed-over server forgot the script: load it once more.
                self._sha = await self._client.script_load(SCRIPT)
                result = await self._client.evalsha(self._sha, len(keys), *keys, *argv)
        except asyncio.CancelledError:
            if not self._deadlines.overran(task, before):
                raise
            await self._drop_connections()
            raise StoreUnavailable(f"Redis silent for {self._timeout_s} s") from None
        except UNREACHABLE as exc:
            await self._drop_connections()
            _cancel_swallowed(before)
            raise StoreUnavailable(f"Redis unreachable: {exc!r}") from exc
        finally:
            self._deadlines.leave(task)
        if task.cancelling() > before:  # swallowed by the driver (it can while it connects)
            raise asyncio.CancelledError
        return cast(list[object], result)

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]:
        args: list[str | int] = [lane]
        for grant_id, tokens in requests:
            args += (grant_id, tokens)
        # The script replies with integers: kind, value for each request decided, then now.
        reply = cast(list[int], await self.call(model, limits, "admit", args))
        now = reply[-1]
        return [Decision(reply[i], reply[i + 1], now) for i in range(0, len(reply) - 1, 2)]

    async def settle(
        self, model: str, limits: Limits, grant_id: str, estimate: int, actual: int, lane: str
    ) -> int:
        result = await self.call(model, limits, "settle", [grant_id, estimate, actual, lane])
        return int(str(result[0]))

    async def release(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> bool:
        result = await self.call(model, limits, "release", [grant_id, tokens, lane])
        return int(str(result[0])) == 1

    async def report(self, model: str, limits: Limits, retry_after_us: int, teach: bool) -> None:
        await self.call(model, limits, "report", [retry_after_us, "1" if teach else "0"])

    async def snapshot(self, model: str, limits: Limits) -> Snapshot:
        out = await self.call(model, limits, "snapshot", [])
        head = [int(str(x)) for x in out[:9]]
        now, requests, tokens, factor, pause, today, booked_requests, booked_tokens = head[:8]
        lanes: dict[str, tuple[int, int]] = {}
        rest = out[9:]
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
            head[8],
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
        self._deadlines.close()
        await self._client.aclose()
