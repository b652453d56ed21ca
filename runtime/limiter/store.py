"""The port of the limiter's shared state: each call is one atomic decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runtime.limiter.budget import Decision, Limits, Snapshot


class RateStore(Protocol):
    """Where admissions are decided: Redis for a fleet, memory for one process.

    Every method applies the arithmetic of ``budget.py`` atomically to one model's state.
    Implementations raise ``StoreUnavailable`` when the state cannot be reached.
    """

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]: ...

    async def settle(
        self, model: str, limits: Limits, grant_id: str, estimate: int, actual: int, lane: str
    ) -> int: ...

    async def release(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> bool: ...

    async def report(
        self, model: str, limits: Limits, retry_after_us: int, teach: bool
    ) -> None: ...

    async def snapshot(self, model: str, limits: Limits) -> Snapshot: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
