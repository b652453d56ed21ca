"""Benchmarks of the runtime; ``python -m benchmarks`` writes ``docs/benchmarks.md``.

Every section is a module with ``run(quick: bool = False) -> str`` returning Markdown, and
runs alone as ``python -m benchmarks.<name>``. Benchmarks measure and report; they never
assert timings.
"""

from __future__ import annotations

# Section name -> module, in the order of the report.
SECTIONS: dict[str, str] = {
    "policies": "benchmarks.policies",
    "quota_cut": "benchmarks.quota_cut",
    "uncertainty": "benchmarks.uncertainty",
    "limiter": "benchmarks.limiter",
    "poller": "benchmarks.poller",
    "footprint": "benchmarks.footprint",
}

__all__ = ["SECTIONS"]
