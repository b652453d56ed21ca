"""Prometheus metrics of one worker process, served on ``METRICS_PORT``.

Job outcomes are counted as they happen; the limiter's and the poller's counters are read
at scrape time; queue depth and limiter usage need I/O, so a side task refreshes them and
the scrape reads the last values. Each worker has its own registry (no global state).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.limiter import Limiter, Usage

QUEUE_REFRESH_S = 10.0
_STATUS_NAMES = {1: "waiting", 2: "scraping", 3: "ready", 4: "failed", 5: "done", 6: "in_ocr"}


class _Counted(Protocol):
    @property
    def stats(self) -> object: ...


class _QueueDepth(Protocol):
    async def queue_depth(self) -> dict[tuple[int, str], int]: ...


class Metrics:
    """Every metric of one worker."""

    def __init__(self, *, models: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "ocr_jobs", "Jobs finished, by type and outcome", ["type", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.job_duration = Histogram(
            "ocr_job_duration_seconds", "Duration of finished jobs", ["type"],
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=self.registry,
        )  # fmt: skip
        self.jobs_in_flight = Gauge(
            "ocr_jobs_in_flight", "Jobs running now", ["type"], registry=self.registry
        )
        self.models = list(models)
        self._limiter: Limiter | None = None
        self._poller: _Counted | None = None
        self._store: _QueueDepth | None = None
        self.queue: dict[tuple[int, str], int] = {}
        self.usage: dict[str, Usage] = {}
        self.registry.register(_Snapshots(self))

    def watch(self, *, limiter: Limiter, poller: _Counted, store: _QueueDepth) -> None:
        self._limiter, self._poller, self._store = limiter, poller, store

    def job_finished(self, document_source: str, outcome: str, duration_s: float) -> None:
        self.jobs.labels(document_source, outcome).inc()
        self.job_duration.labels(document_source).observe(duration_s)

    async def refresh(self) -> None:
        """Read what needs I/O: queue depth by status and type, limiter usage by model."""
        if self._store is not None:
            with contextlib.suppress(Exception):  # the poller reports database trouble
                self.queue = await self._store.queue_depth()
        if self._limiter is not None:
            for model in self.models:
                with contextlib.suppress(Exception):
                    self.usage[model] = await self._limiter.usage(model=model)

    async def refresh_forever(self, every_s: float = QUEUE_REFRESH_S) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(every_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshots(Collector):
    """Reads the limiter's and poller's counters and the refreshed values at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        limiter = metrics._limiter
        if limiter is not None:
            stats = limiter.stats
            for name, value, help_text in (
                ("gemini_admissions", stats.admissions, "Gemini calls admitted"),
                ("gemini_admission_wait_seconds", stats.wait_s_total, "Time spent waiting"),
                ("gemini_rate_limited", stats.rate_limited_reports, "429 answers reported"),
                ("gemini_quota_429", stats.quota_reports, "429 answers naming a quota"),
                ("gemini_tokens_reserved", stats.tokens_reserved, "Tokens reserved"),
                ("gemini_tokens_settled", stats.tokens_settled, "Tokens settled"),
                ("gemini_fallback_admissions", stats.fallback_admissions, "Admitted w/o Redis"),
            ):
                yield CounterMetricFamily(name, help_text, value=value)
            yield GaugeMetricFamily(
                "gemini_calls_in_flight", "Admitted calls not finished", value=limiter.inflight
            )
            yield GaugeMetricFamily(
                "gemini_limiter_degraded", "1 while Redis is unreachable", value=limiter.degraded
            )
        budget = GaugeMetricFamily(
            "gemini_effective_budget", "Budget after 429 adaptation", labels=["model", "kind"]
        )
        used = GaugeMetricFamily(
            "gemini_window_usage", "Used in the rolling window", labels=["model", "kind"]
        )
        paused = GaugeMetricFamily(
            "gemini_paused_seconds", "Pause in force after a 429", labels=["model"]
        )
        for model, usage in metrics.usage.items():
            budget.add_metric([model, "rpm"], usage.effective_rpm)
            budget.add_metric([model, "tpm"], usage.effective_tpm)
            used.add_metric([model, "rpm"], usage.requests)
            used.add_metric([model, "tpm"], usage.tokens)
            paused.add_metric([model], usage.paused_for_s)
        yield from (budget, used, paused)
        poller = metrics._poller
        if poller is not None:
            counts = vars(poller.stats)
            family = CounterMetricFamily("ocr_poller", "Poller events", labels=["event"])
            for event, value in counts.items():
                if event != "in_flight":
                    family.add_metric([event], value)
            yield family
        depth = GaugeMetricFamily(
            "ocr_queue_depth", "Rows of extraction_queue", labels=["status", "type"]
        )
        for (status, source), rows in sorted(metrics.queue.items()):
            depth.add_metric([_STATUS_NAMES.get(status, str(status)), source], rows)
        yield depth


async def serve_metrics(metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` until cancelled."""

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
