"""Job profiles: what a job of each type costs on average, as the fleet measured it.

Every finished job adds its calls, tokens and duration to running sums per document type
(in Redis for a fleet, in memory for one process). The capacity planner reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions

from runtime.pipelines.common import Profile

_FIELDS = ("jobs", "calls", "input_tokens", "output_tokens", "duration_s", "pages")


@dataclass(frozen=True)
class TypeProfile:
    """The average job of one document type."""

    jobs: int
    calls: float
    tokens: float  # input + output, as the design note counted them
    input_tokens: float
    duration_s: float
    pages: float


# The original system's figures (design note), used until the fleet has measured its own.
SEED_PROFILES: Mapping[str, TypeProfile] = {
    "index": TypeProfile(
        jobs=0, calls=20, tokens=161_000, input_tokens=110_000, duration_s=180, pages=10
    ),
    "acte": TypeProfile(
        jobs=0, calls=3, tokens=101_000, input_tokens=30_000, duration_s=25, pages=8
    ),
}


class ProfileStore(Protocol):
    async def record(self, profile: Profile) -> None: ...

    async def sums(self) -> dict[str, dict[str, float]]: ...


def averages(
    sums: Mapping[str, Mapping[str, float]], *, min_jobs: int = 5
) -> dict[str, TypeProfile]:
    """Measured averages per type where enough jobs were seen, seed figures elsewhere."""
    profiles = dict(SEED_PROFILES)
    for source, total in sums.items():
        jobs = int(total.get("jobs", 0))
        if jobs < min_jobs:
            continue
        inputs = total.get("input_tokens", 0.0)
        profiles[source] = TypeProfile(
            jobs=jobs,
            calls=total.get("calls", 0.0) / jobs,
            tokens=(inputs + total.get("output_tokens", 0.0)) / jobs,
            input_tokens=inputs / jobs,
            duration_s=total.get("duration_s", 0.0) / jobs,
            pages=total.get("pages", 0.0) / jobs,
        )
    return profiles


def _sample(profile: Profile) -> tuple[float, ...]:
    """One job's contribution to the running sums, in the order of ``_FIELDS``."""
    return (
        1,
        profile.calls,
        profile.input_tokens,
        profile.output_tokens,
        profile.duration_s,
        profile.pages,
    )


class MemoryProfiles:
    def __init__(self) -> None:
        self._sums: dict[str, dict[str, float]] = {}

    async def record(self, profile: Profile) -> None:
        total = self._sums.setdefault(profile.document_source, dict.fromkeys(_FIELDS, 0.0))
        for name, value in zip(_FIELDS, _sample(profile), strict=True):
            total[name] += value

    async def sums(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self._sums.items()}


class RedisProfiles:
    """Running sums in one Redis hash per document type, kept 30 days after the last job."""

    _TTL_S = 30 * 24 * 3600

    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self._client = client
        self._prefix = f"{namespace}:profiles:"

    async def record(self, profile: Profile) -> None:
        key = self._prefix + profile.document_source
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for name, value in zip(_FIELDS, _sample(profile), strict=True):
                    pipe.hincrbyfloat(key, name, float(value))
                pipe.expire(key, self._TTL_S)
                await pipe.execute()
        except redis.exceptions.RedisError:
            return  # profiles are statistics: a lost sample is no loss

    async def sums(self) -> dict[str, dict[str, float]]:
        found: dict[str, dict[str, float]] = {}
        async for key in self._client.scan_iter(match=self._prefix + "*"):
            name = key.decode() if isinstance(key, bytes) else str(key)
            raw = await self._client.hgetall(name)
            found[name.removeprefix(self._prefix)] = {
                (k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()
            }
        return found
