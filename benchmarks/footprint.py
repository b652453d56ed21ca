"""Footprint of one process running 1,000 pipelines at once against a slow model.

A fresh process (so that nothing measured before weighs on its peak) starts 1,000
concurrent ``run_acte`` pipelines: upload the PDF, wait until it is ACTIVE, extract, boost,
delete; every generate call goes through ``GeminiClient`` and an in-process limiter whose
budget is out of reach. The emulator runs in a process of its own and answers each
generate call after a random 2-5 s. Measured in the pipelines' process: peak RSS
(``getrusage``) and event-loop lag (a ticker asks for 50 ms sleeps and records the
overshoot). Run alone with ``python -m benchmarks.footprint``.

The measured configuration caps the Gemini calls in flight at ``INFLIGHT`` = 256: the
limiter's ``max_inflight`` and the client's ``max_inflight`` (File API calls), the two
limits the worker sets from ``GEMINI_MAX_INFLIGHT`` (16 by default). All 1,000 pipelines
still run at once in the process; beyond the cap they wait their turn in the limiter or
for a File API slot. The cap is there because the google-genai SDK spends CPU on every
request and answer (pydantic conversion): about 2.5 ms per generate call, 0.5-1 ms per
File API call, some 10 ms per acte. With every call in flight, 1,000 extractions answered
within the same 3 s keep the process's core busy; the client paces how many calls start
per loop turn, but the answers are parsed as they arrive, and the loop still lags. A
second run with every call in flight (``max_inflight=1000``) is reported beside the
measured one, so what the cap buys, and costs in wall time, is visible.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from queue import Empty
from typing import Any

PIPELINES = 1_000
INFLIGHT = 256  # Gemini calls in flight (limiter and File API); see the module docstring
DISTINCT_PDFS = 50
TICK_S = 0.05
LATENCY_S = (2.0, 5.0)
TARGET_RSS_MB = 250.0
TARGET_P99_MS = 50.0
SETTLE_S = 10.0  # the start-up burst: every pipeline opens its PDF and uploads at once


@dataclass(frozen=True)
class Row:
    """The parts of a queue row ``run_acte`` reads."""

    document_source: str
    document_number: str | None
    supabase_path: str | None


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _quiet_logs() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


# --- the slow emulator, in its own process --------------------------------------------


def _serve(seed: int, urls: Queue[str], stop: Event, stats: Queue[dict[str, Any]]) -> None:
    _quiet_logs()
    asyncio.run(_serve_async(seed, urls, stop, stats))


async def _serve_async(
    seed: int, urls: Queue[str], stop: Event, stats: Queue[dict[str, Any]]
) -> None:
    from aiohttp import web

    from runtime.emulator import Emulator, EmulatorConfig

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
    rng = random.Random(seed)
    in_flight = 0
    peak = 0

    @web.middleware
    async def slow(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight, peak
        if not request.path.endswith(":generateContent"):
            return await handler(request)
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(rng.uniform(*LATENCY_S))
            return await handler(request)
        finally:
            in_flight -= 1

    emulator = Emulator(EmulatorConfig(rpm=None, tpm=None, seed=seed))
    emulator.app.middlewares.append(slow)
    async with emulator:
        urls.put(emulator.base_url)
        await asyncio.to_thread(stop.wait)
        found = emulator.stats()
    generated = sum(m["requests"] for m in found["models"].values())
    # Prefixed: the files' own "failed" (processing failed) must not overwrite the count of
    # failed pipelines.
    files = {f"files_{key}": value for key, value in found["files"].items()}
    stats.put({"peak_generate_in_flight": peak, "generate_calls": generated, **files})


# --- the pipelines' process -------------------------------------------------------------


def _pipelines(base_url: str, inflight: int, results: Queue[dict[str, Any]]) -> None:
    _quiet_logs()
    results.put(asyncio.run(_pipelines_async(base_url, inflight)))


async def _pipelines_async(base_url: str, inflight: int) -> dict[str, Any]:
    from runtime.emulator import make_acte_pdf
    from runtime.limiter import Budget, create_limiter
    from runtime.pipelines import GeminiClient, PipelineConfig, run_acte
    from runtime.pipelines.estimates import MemoryEstimates

    samples = [make_acte_pdf(pages=2, seed=n)[0] for n in range(DISTINCT_PDFS)]
    # One PDF object per job, as if each had been fetched from storage.
    pdfs = [bytes(bytearray(samples[n % DISTINCT_PDFS])) for n in range(PIPELINES)]
    rows = [Row("acte", f"B-{n}", f"actes/{n}.pdf") for n in range(PIPELINES)]
    budget = Budget(rpm=1_000_000, tpm=100_000_000, window_s=60.0)
    # One knob for both limits, as the worker wires GEMINI_MAX_INFLIGHT.
    limiter = await create_limiter(None, budget, namespace="footprint", max_inflight=inflight)
    client = GeminiClient(
        api_key="bench-key",
        base_url=base_url,
        limiter=limiter,
        estimates=MemoryEstimates(),
        max_inflight=inflight,
    )
    config = PipelineConfig()
    baseline_mb = _rss_mb()
    lags: list[float] = []
    stamps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(max(0.0, time.perf_counter() - t0 - TICK_S))
            stamps.append(t0)

    running = 0
    most_running = 0
    running_at_first_end: int | None = None

    async def one(n: int) -> bool:
        nonlocal running, most_running, running_at_first_end
        running += 1
        most_running = max(most_running, running)
        try:
            await run_acte(rows[n], pdfs[n], client, config)
        except Exception:
            return False
        finally:
            if running_at_first_end is None:
                running_at_first_end = running
            running -= 1
        return True

    ticks = asyncio.create_task(ticker())
    started = time.perf_counter()
    cpu_started = time.process_time()
    outcomes = await asyncio.gather(*(one(n) for n in range(PIPELINES)))
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    done.set()
    await ticks
    steady = [lag for at, lag in zip(stamps, lags, strict=True) if at - started >= SETTLE_S]
    await client.aclose()
    await limiter.aclose()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "baseline_mb": baseline_mb,
        "peak_mb": peak_mb,
        "lag_p50_ms": _percentile(lags, 0.5) * 1000,
        "lag_p99_ms": _percentile(lags, 0.99) * 1000,
        "lag_max_ms": max(lags) * 1000,
        "lag_mean_ms": statistics.fmean(lags) * 1000,
        "ticks": len(lags),
        "ok": sum(outcomes),
        "failed": PIPELINES - sum(outcomes),
        "elapsed_s": elapsed,
        "cpu_s": cpu_s,
        "most_running": most_running,
        "running_at_first_end": running_at_first_end or 0,
        "lag_p99_after_ms": _percentile(steady or [0.0], 0.99) * 1000,
        "lag_over_50ms": sum(1 for lag in lags if lag > TARGET_P99_MS / 1000),
        "lag_over_50ms_after": sum(1 for lag in steady if lag > TARGET_P99_MS / 1000),
    }


def _wait_for(queue: Queue[Any], process: Any, timeout_s: float) -> Any:
    """The next item of ``queue``; an error if ``process`` dies or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"{process.name} exited with {process.exitcode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} gave no answer in {timeout_s:g} s") from None


def measure(inflight: int = INFLIGHT) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    urls: Queue[str] = context.Queue()
    stats: Queue[dict[str, Any]] = context.Queue()
    results: Queue[dict[str, Any]] = context.Queue()
    stop = context.Event()
    server = context.Process(target=_serve, args=(11, urls, stop, stats), name="emulator")
    server.start()
    try:
        base_url = _wait_for(urls, server, 120)
        worker = context.Process(
            target=_pipelines, args=(base_url, inflight, results), name="pipelines"
        )
        worker.start()
        try:
            found: dict[str, Any] = _wait_for(results, worker, 1_800)
        finally:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
        stop.set()
        found.update(_wait_for(stats, server, 60))
    finally:
        stop.set()
        server.join(30)
        if server.is_alive():
            server.kill()
    return found


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def run(quick: bool = False) -> str:
    """Measure each configuration once (``quick`` changes nothing: one run is already
    1,000 pipelines)."""
    capped = measure(INFLIGHT)
    uncapped = measure(PIPELINES)

    def row(label: str, cell: Callable[[dict[str, Any]], str], target: str = "") -> str:
        return f"| {label} | {cell(capped)} | {cell(uncapped)} | {target} |"

    rss_ok = capped["peak_mb"] <= TARGET_RSS_MB
    lag_ok = capped["lag_p99_ms"] <= TARGET_P99_MS
    return "\n".join(
        [
            "## Footprint: 1,000 concurrent pipelines in one process",
            "",
            f"{PIPELINES:,} `run_acte` pipelines started at once in one fresh process (2-page "
            f"PDFs, each its own bytes object): upload, wait for ACTIVE, extract, boost, delete. "
            f"Every generate call goes through `GeminiClient` and an in-process limiter with a "
            f"budget out of reach. The emulator runs in its own process and answers each "
            f"generate call after a uniform {LATENCY_S[0]:g}-{LATENCY_S[1]:g} s. Event-loop "
            f"lag: a ticker sleeps {TICK_S * 1000:g} ms in a loop and records the overshoot. "
            f"One run per configuration, each in a fresh process with a fresh emulator.",
            "",
            f"Measured configuration: at most **{INFLIGHT} Gemini calls in flight** (the "
            f"limiter's `max_inflight` and the client's `max_inflight` for File API calls, "
            f"the two limits the worker sets from `GEMINI_MAX_INFLIGHT`, 16 by default). "
            f"All {PIPELINES:,} pipelines still run at once; beyond the cap they wait in the "
            f"limiter or for a File API slot. Why a cap: the google-genai SDK spends about 2.5 "
            f"ms of CPU per generate call (pydantic conversion of request and answer), so "
            f"with every call in flight a thousand answers due within the same seconds keep "
            f"the process's core busy; the client paces how many calls start per loop turn, "
            f"but answers are parsed as they arrive. The last column runs the same pipelines "
            f"with every call in flight (`max_inflight={PIPELINES}`) for comparison; the "
            f"targets are judged on the measured configuration.",
            "",
            f"| measure | {INFLIGHT} in flight (measured) | {PIPELINES:,} in flight "
            f"(comparison) | target |",
            "|---|---:|---:|---:|",
            row(
                "RSS after imports and set-up, before the pipelines",
                lambda r: f"{r['baseline_mb']:.0f} MB",
            ),
            row(
                "peak RSS (getrusage)",
                lambda r: f"{r['peak_mb']:.0f} MB",
                f"<= {TARGET_RSS_MB:g} MB ({_met(rss_ok)})",
            ),
            row("event-loop lag p50", lambda r: f"{r['lag_p50_ms']:.1f} ms"),
            row(
                "event-loop lag p99",
                lambda r: f"{r['lag_p99_ms']:.1f} ms",
                f"<= {TARGET_P99_MS:g} ms ({_met(lag_ok)})",
            ),
            row(
                f"event-loop lag p99 from the {SETTLE_S:g}th second on (after the start-up burst)",
                lambda r: f"{r['lag_p99_after_ms']:.1f} ms",
            ),
            row("event-loop lag max", lambda r: f"{r['lag_max_ms']:.1f} ms"),
            row(
                f"ticks over {TARGET_P99_MS:g} ms: whole run / from the {SETTLE_S:g}th second",
                lambda r: f"{r['lag_over_50ms']} of {r['ticks']} / {r['lag_over_50ms_after']}",
            ),
            row(
                "pipelines running at once: most / still running when the first ended",
                lambda r: f"{r['most_running']:,} / {r['running_at_first_end']:,}",
            ),
            row(
                "pipelines done / failed",
                lambda r: f"{r['ok']:,} / {r['failed']:,}",
            ),
            row("wall time for all pipelines", lambda r: f"{r['elapsed_s']:.1f} s"),
            row(
                "CPU time of the pipelines' process (per pipeline)",
                lambda r: f"{r['cpu_s']:.1f} s ({r['cpu_s'] / PIPELINES * 1000:.1f} ms)",
            ),
            row(
                "generate calls served / most in flight at once",
                lambda r: f"{r['generate_calls']:,} / {r['peak_generate_in_flight']:,}",
            ),
            row(
                "files uploaded / deleted / left behind",
                lambda r: (
                    f"{r['files_uploaded']:,} / {r['files_deleted']:,} / {r['files_stored']:,}"
                ),
            ),
            "",
        ]
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
