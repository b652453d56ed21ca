"""The fleet limiter when the real quota is halved under it, over many windows.

The saturated workload of the policies section, under the fleet limiter only, runs for
a long stretch; a few windows in, the emulator's quota drops to half while the fleet's
configured budget stays as it was. What is measured: the 429s while the fleet adapts
(the two windows after the cut), the 429 rate after that, the windows in which 429s
came (the probes back up), and how much of the new quota the fleet used. Run alone with
``python -m benchmarks.quota_cut``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys

from benchmarks.policies import Workload, run_policy
from runtime.services import local_services

ADAPT_WINDOWS = 2  # the fleet must have adapted this many windows after the cut


def run(quick: bool = False) -> str:
    """Measure and return the Markdown section for docs/benchmarks.md."""
    load = Workload(window_s=2.0, warmup_windows=1, windows=39 if quick else 59)
    cut_window = 5
    with local_services(os.environ.get("REDIS_URL"), "unused", with_redis=True) as urls:
        assert urls.redis_url is not None
        result = asyncio.run(run_policy("ours", urls.redis_url, load, cut_window * load.window_s))
    w = load.window_s
    end = load.duration_s
    adapted_at = (cut_window + ADAPT_WINDOWS) * w

    def phase(low: float, high: float) -> tuple[int, int]:
        inside = [ok for at, _, ok in result.events if low <= at < high]
        return len(inside), sum(1 for ok in inside if not ok)

    before = phase(0.0, cut_window * w)
    adapting = phase(cut_window * w, adapted_at)
    after = phase(adapted_at, end)
    new_quota = load.rpm // 2
    admitted = [
        sum(1 for at, _, ok in result.events if ok and k * w <= at < (k + 1) * w)
        for k in range(cut_window + ADAPT_WINDOWS, int(end / w))
    ]
    probes = sorted({int(at // w) - cut_window for at, _, ok in result.events
                     if not ok and at >= adapted_at})  # fmt: skip
    rate = after[1] / max(1, after[0])
    verdict = "meets" if rate < 0.01 else "misses"
    measured = len(admitted)
    return "\n".join(
        [
            "## Quota halved under the fleet",
            "",
            f"The policies section's workload under the fleet limiter only ({load.processes} "
            f"processes x {load.callers} callers, quota = budget = {load.rpm} requests and "
            f"{load.tpm:,} tokens per strict rolling {w:g} s window, model latency "
            f"{load.latency_ms:g} ms), for {int(end / w)} windows. At window {cut_window} "
            f"the emulator's quota drops to {new_quota} requests and {load.tpm // 2:,} tokens;"
            f" the fleet's budget stays at {load.rpm}. It learns the new level from the quota "
            "429s alone (one run).",
            "",
            "| phase | calls arrived | 429s | 429 rate |",
            "|---|---:|---:|---:|",
            f"| before the cut ({cut_window} windows) | {before[0]} | {before[1]} | "
            f"{100 * before[1] / max(1, before[0]):.1f} % |",
            f"| adapting (the {ADAPT_WINDOWS} windows after the cut) | {adapting[0]} | "
            f"{adapting[1]} | {100 * adapting[1] / max(1, adapting[0]):.1f} % |",
            f"| after ({measured} windows) | {after[0]} | {after[1]} | {100 * rate:.2f} % |",
            "",
            f"Windows after the cut in which 429s came (probes back up): "
            f"{', '.join(map(str, probes)) or 'none'}. Requests admitted per window after "
            f"adapting: median {statistics.median(admitted):g} of the new quota's "
            f"{new_quota} ({100 * statistics.median(admitted) / new_quota:.0f} %), "
            f"lowest {min(admitted)}, highest {max(admitted)}.",
            "",
            f"After adapting, **{100 * rate:.2f} %** of calls got a 429 ({verdict} the "
            "target of under 1 %).",
            "",
        ]
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
