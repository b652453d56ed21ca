"""One worker process of the multi-process limiter test: N acquirers against a shared Redis.

Run as ``python -m limiter_fleet URL NAMESPACE ACQUIRERS START END RPM TPM WINDOW OUT``;
writes one line per admission: booked slot, wall-clock entry time, estimate, actual.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from runtime.limiter import Budget, create_limiter


async def main(argv: list[str]) -> list[str]:
    url, namespace, acquirers, start, end, rpm, tpm, window, _ = argv
    budget = Budget(rpm=int(rpm), tpm=int(tpm), window_s=float(window))
    limiter = await create_limiter(url, budget, namespace=namespace, max_inflight=int(acquirers))
    rows: list[str] = []
    rng = random.Random()
    await asyncio.sleep(max(0.0, float(start) - time.time()))

    async def acquirer() -> None:
        while time.time() < float(end):
            estimate = rng.randint(1, int(tpm) // int(rpm))
            async with limiter.acquire(estimate, model="flash", lane="acte") as grant:
                entered = time.time()
                await asyncio.sleep(rng.uniform(0.0, 0.05))  # the call
                actual = rng.randint(0, estimate)
                await grant.settle(actual)
                rows.append(f"{grant.slot:.6f} {entered:.6f} {estimate} {actual}")

    await asyncio.gather(*(acquirer() for _ in range(int(acquirers))))
    await limiter.aclose()
    return rows


if __name__ == "__main__":
    lines = asyncio.run(main(sys.argv[1:]))
    with open(sys.argv[-1], "w") as handle:
        handle.write("\n".join(lines) + "\n")
