"""The client's pacer: a few starts per event-loop turn, in order, cancellation-safe."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from runtime.pipelines.gemini import Pacer


async def test_a_few_callers_per_turn_in_arrival_order() -> None:
    loop = asyncio.get_running_loop()
    turn = 0
    counting = True

    def count() -> None:  # one increment per pass of the loop
        nonlocal turn
        turn += 1
        if counting:
            loop.call_soon(count)

    loop.call_soon(count)
    pacer = Pacer(2)
    started: list[tuple[int, int]] = []

    async def caller(n: int) -> None:
        await pacer.turn()
        started.append((n, turn))

    await asyncio.gather(*(caller(n) for n in range(9)))
    counting = False
    assert [n for n, _ in started] == list(range(9))
    per_turn = Counter(at for _, at in started)
    assert max(per_turn.values()) <= 2
    assert len(per_turn) >= 5  # nine callers, two a turn: five turns at least


async def test_a_cancelled_caller_gives_its_place_up() -> None:
    pacer = Pacer(1)
    first = asyncio.create_task(pacer.turn())
    second = asyncio.create_task(pacer.turn())
    third = asyncio.create_task(pacer.turn())
    await asyncio.sleep(0)  # the first passes; the others queue
    second.cancel()
    await asyncio.wait_for(asyncio.gather(first, third), 1)
    assert second.cancelled()


def test_at_least_one_start_per_turn() -> None:
    with pytest.raises(ValueError, match="per_turn"):
        Pacer(0)
