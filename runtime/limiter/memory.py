"""The in-process ``RateStore``: the pure core over a dictionary, for one process.

Used when no Redis is configured, as the fallback while Redis is unreachable, and by
the tests. It follows exactly the same arithmetic as the Lua script.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from runtime.limiter import budget
from runtime.limiter.budget import Decision, Limits, ModelState, Snapshot


def wall_clock_us() -> int:
    """Microseconds since the epoch: the same clock Redis ``TIME`` reads."""
    return time.time_ns() // 1000


class MemoryRateStore:
    """Admission state of every model, kept in this process."""

    def __init__(self, clock: Callable[[], int] = wall_clock_us) -> None:
        self._clock = clock
        self._states: dict[str, ModelState] = {}

    def state(self, model: str) -> ModelState:
        return self._states.setdefault(model, ModelState())

    async def admit_many(
        self, model: str, limits: Limits, requests: Sequence[tuple[str, int]], lane: str
    ) -> list[Decision]:
        return budget.admit_many(self.state(model), limits, self._clock(), requests, lane)

    async def settle(
        self, model: str, limits: Limits, grant_id: str, estimate: int, actual: int, lane: str
    ) -> int:
        state = self.state(model)
        return budget.settle(state, limits, self._clock(), grant_id, estimate, actual, lane)

    async def release(
        self, model: str, limits: Limits, grant_id: str, tokens: int, lane: str
    ) -> bool:
        return budget.release(self.state(model), limits, self._clock(), grant_id, tokens, lane)

    async def report(self, model: str, limits: Limits, retry_after_us: int, teach: bool) -> None:
        budget.report(self.state(model), limits, self._clock(), retry_after_us, teach)

    async def snapshot(self, model: str, limits: Limits) -> Snapshot:
        return budget.snapshot(self.state(model), limits, self._clock())

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._states.clear()
