"""Four OS processes, fifty acquirers each, one budget: exact in every window, fully used."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RPM, TPM, W = 40, 4_000, 1.0
PROCESSES, ACQUIRERS, RUN_S = 4, 50, 5.0


def window_peaks(rows: list[tuple[float, int]]) -> tuple[int, int]:
    """The most requests and tokens any rolling window (t - W, t] holds."""
    rows = sorted(rows)
    peak_r = peak_t = 0
    start = 0
    tokens = 0
    for end, (t, charge) in enumerate(rows):
        tokens += charge
        while rows[start][0] <= t - W:
            tokens -= rows[start][1]
            start += 1
        peak_r = max(peak_r, end - start + 1)
        peak_t = max(peak_t, tokens)
    return peak_r, peak_t


@pytest.mark.slow
def test_fleet_never_exceeds_and_uses_the_budget(redis_url: str, tmp_path: Path) -> None:
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.time() + 2.5  # every process imported and connected before the start
    end = start + RUN_S
    outputs = [tmp_path / f"worker{n}.txt" for n in range(PROCESSES)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "limiter_fleet",
                redis_url,
                "fleet",
                str(ACQUIRERS),
                str(start),
                str(end),
                str(RPM),
                str(TPM),
                str(W),
                str(out),
            ],
            env=env,
        )
        for out in outputs
    ]
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    rows = [line.split() for out in outputs for line in out.read_text().splitlines() if line]
    slots = [(float(r[0]), int(r[3])) for r in rows]  # final charge: the actual (refunds only)
    entered = [(float(r[1]), int(r[3])) for r in rows]
    peak_r, peak_t = window_peaks(slots)
    assert peak_r <= RPM
    assert peak_t <= TPM
    # Utilisation at saturation: whole windows after the first, on the binding dimension.
    steady = [t for t, _ in slots if start + W <= t < end - W]
    used_r = len(steady) / (RPM * (RUN_S - 2 * W))
    used_t = sum(c for t, c in slots if start + W <= t < end - W) / (TPM * (RUN_S - 2 * W))
    wall_r, _ = window_peaks(entered)
    print(
        f"\nfleet: {len(rows)} admissions from {PROCESSES} processes; peak window "
        f"{peak_r}/{RPM} requests, {peak_t}/{TPM} tokens; utilisation {used_r:.1%} of "
        f"requests, {used_t:.1%} of tokens; peak by wall-clock entry {wall_r}/{RPM}"
    )
    assert max(used_r, used_t) >= 0.9
    assert wall_r <= RPM + 1  # arrival skew after pacing: at most one request
