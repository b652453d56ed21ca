"""The waiters of one process, queued per (model, lane) in FIFO order.

One waiter of a queue leads at a time: it books itself and the waiters behind it in one
store call (see ``Limiter._lead``). The lead passes on with ``WaiterQueue.hand_on``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

from runtime.limiter.budget import Decision, Limits
from runtime.limiter.store import RateStore


def admitting(
    key: str, requests: list[tuple[str, int]], lane: str
) -> Callable[[RateStore, Limits], Awaitable[list[Decision]]]:
    """The store operation that books ``requests`` of one lane, in order."""
    return lambda store, limits: store.admit_many(key, limits, requests, lane)


class Booking(NamedTuple):
    """Where and when a waiter was booked."""

    store: RateStore
    limits: Limits
    decision: Decision


@dataclass(eq=False, slots=True)
class Waiter:
    """One caller of ``acquire``; its future says "booked" or, with None, "lead now"."""

    grant_id: str
    tokens: int
    future: asyncio.Future[Booking | None]
    variance: int = 0
    leading: bool = False
    holds_slot: bool = False
    booking: Booking | None = None


class WaiterQueue:
    """The waiters of one (model, lane) in this process: at most one of them leads."""

    def __init__(self) -> None:
        self.waiters: deque[Waiter] = deque()
        self.led = False  # a waiter leads, or the lead passes on at a booked slot

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self.waiters if not waiter.future.done())

    def hand_on(self) -> None:
        """Give the lead to the first waiter still waiting, or leave the queue unled."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # lead the queue
                return
        self.led = False
