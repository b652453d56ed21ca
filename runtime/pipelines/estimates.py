"""Token estimates for reservations, learned from the usage the API reports.

A reservation must be made before the call, from what is known then: the pages and the
prompt. Input is predictable (258 tokens a PDF page, about 4 characters a token, scaled by
a learned correction); output is not, so each call kind keeps a moving average and a
moving deviation of its real output, shared by the fleet in Redis and seeded with the
figures of the original system. Reserving mean + deviation keeps most settles refunds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions

PDF_PAGE_TOKENS = 258
CHARS_PER_TOKEN = 4
_ALPHA = 0.2  # weight of the newest observation in the moving averages

# Output tokens per call kind in the original system (design note): the starting point.
SEED_OUTPUT_TOKENS: Mapping[str, float] = {
    "line_count": 100,
    "index_extract": 5_000,
    "index_recount": 5_000,
    "acte_extract": 25_000,
    "boost": 25_000,
}
_DEFAULT_OUTPUT = 2_000


@dataclass(frozen=True)
class Learned:
    """What the fleet has learned about one call kind."""

    output_mean: float
    output_dev: float
    input_ratio: float  # actual input tokens / heuristic input tokens

    @property
    def output_reserve(self) -> int:
        return math.ceil(self.output_mean + self.output_dev)


def seed(kind: str) -> Learned:
    mean = SEED_OUTPUT_TOKENS.get(kind, _DEFAULT_OUTPUT)
    return Learned(output_mean=mean, output_dev=mean * 0.25, input_ratio=1.0)


def heuristic_input(prompt_chars: int, pages: int) -> int:
    return pages * PDF_PAGE_TOKENS + math.ceil(prompt_chars / CHARS_PER_TOKEN)


def updated(old: Learned, *, heuristic_in: int, actual_in: int, actual_out: int) -> Learned:
    """The moving averages after one observation (mirrored by ``estimates.lua``)."""
    dev = (1 - _ALPHA) * old.output_dev + _ALPHA * abs(actual_out - old.output_mean)
    mean = (1 - _ALPHA) * old.output_mean + _ALPHA * actual_out
    ratio = old.input_ratio
    if heuristic_in > 0 and actual_in > 0:
        ratio = (1 - _ALPHA) * ratio + _ALPHA * (actual_in / heuristic_in)
    return Learned(output_mean=mean, output_dev=dev, input_ratio=ratio)


class EstimateStore(Protocol):
    """Where the learned figures live: Redis for a fleet, memory for one process."""

    async def get(self, kind: str) -> Learned: ...

    async def observe(
        self, kind: str, *, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None: ...


class MemoryEstimates:
    """Learned figures of this process alone."""

    def __init__(self) -> None:
        self._learned: dict[str, Learned] = {}

    async def get(self, kind: str) -> Learned:
        return self._learned.get(kind) or seed(kind)

    async def observe(
        self, kind: str, *, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None:
        self._learned[kind] = updated(
            await self.get(kind),
            heuristic_in=heuristic_in,
            actual_in=actual_in,
            actual_out=actual_out,
        )


class RedisEstimates:
    """Learned figures shared by the fleet; falls back to memory while Redis is away.

    Reads are cached for a few seconds: an estimate needs to be recent, not exact, and a
    read per call would double the Redis round trips of every model call.
    """

    _TTL_S = 7 * 24 * 3600  # forgotten after a week without calls of that kind
    _CACHE_S = 5.0

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._key = f"{namespace}:estimates"
        self._local = MemoryEstimates()
        self._cache: dict[str, tuple[float, Learned]] = {}
        self._clock = clock
        script = resources.files("runtime.pipelines").joinpath("estimates.lua").read_text()
        self._update = client.register_script(script)

    async def get(self, kind: str) -> Learned:
        cached = self._cache.get(kind)
        if cached is not None and self._clock() - cached[0] < self._CACHE_S:
            return cached[1]
        learned = await self._read(kind)
        self._cache[kind] = (self._clock(), learned)
        return learned

    async def _read(self, kind: str) -> Learned:
        try:
            values = await self._client.hmget(
                self._key, f"{kind}:mean", f"{kind}:dev", f"{kind}:ratio"
            )
        except redis.exceptions.RedisError:
            return await self._local.get(kind)
        numbers = [float(v) for v in values if v is not None]
        if len(numbers) != 3:
            return await self._local.get(kind)
        mean, dev, ratio = numbers
        return Learned(output_mean=mean, output_dev=dev, input_ratio=ratio)

    async def observe(
        self, kind: str, *, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None:
        await self._local.observe(
            kind, heuristic_in=heuristic_in, actual_in=actual_in, actual_out=actual_out
        )
        start = seed(kind)
        try:
            await self._update(
                keys=[self._key],
                args=[
                    kind,
                    _ALPHA,
                    start.output_mean,
                    start.output_dev,
                    heuristic_in,
                    actual_in,
                    actual_out,
                    self._TTL_S,
                ],
            )
        except redis.exceptions.RedisError:
            return  # learning is best effort; the local figures carry on
