"""One worker process: the poller, the pipelines, the limiter and the side tasks, wired.

Everything long-lived runs in one TaskGroup: if a side task dies (the registry heartbeat,
the status line, the metrics server) the whole worker stops with a non-zero exit so that
its supervisor restarts it, instead of living on half-alive. SIGTERM and SIGINT stop the
claiming; jobs in flight get ``WORKER_DRAIN_S`` to finish, the rest are handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from runtime.errors import ConfigurationError
from runtime.limiter import Budget, Limiter, create_limiter
from runtime.ops.metrics import Metrics, serve_metrics
from runtime.ops.profiles import MemoryProfiles, ProfileStore, RedisProfiles
from runtime.pipelines import GeminiClient, PipelineConfig, PipelineResult, run_acte, run_index
from runtime.pipelines.common import Document
from runtime.pipelines.documents import DocumentStore, open_documents
from runtime.pipelines.estimates import EstimateStore, MemoryEstimates, RedisEstimates
from runtime.poller import Job, JobResult, Poller, PostgresJobStore
from runtime.settings import Settings

log = structlog.get_logger()

Pipeline = Callable[[Document, bytes, GeminiClient, PipelineConfig], Awaitable[PipelineResult]]
PIPELINES: dict[str, Pipeline] = {"index": run_index, "acte": run_acte}

REGISTRY_HEARTBEAT_S = 10.0
STATUS_EVERY_S = 30.0


def fleet_budget(settings: Settings) -> tuple[Budget, dict[str, Budget]]:
    """The default budget and the per-model ones, after the safety factor."""
    factor = settings.gemini_safety_factor
    # A request reaches Google some time after its admission, and not always the same
    # time: counting admissions over a window widened by that spread keeps every window
    # of ARRIVALS within the quota.
    # The tokens between the budget and the quota carry the margin held for the
    # uncertainty of the calls not settled yet (see runtime.limiter.budget).
    window = settings.gemini_window_s + settings.gemini_arrival_skew_s
    risk = settings.gemini_overrun_risk
    default = Budget(
        rpm=settings.rpm_budget,
        tpm=settings.tpm_budget,
        window_s=window,
        tpm_headroom=settings.gemini_tpm_limit - settings.tpm_budget,
        overrun_risk=risk,
    )
    models = {}
    for model, limit in settings.gemini_model_limits.items():
        tpm = max(1, math.floor(limit.tpm * factor))
        models[model] = Budget(
            rpm=max(1, math.floor(limit.rpm * factor)),
            tpm=tpm,
            window_s=window,
            tpm_headroom=limit.tpm - tpm,
            overrun_risk=risk,
        )
    return default, models


def pipeline_config(settings: Settings) -> PipelineConfig:
    return PipelineConfig(
        model_index=settings.gemini_model_index,
        model_acte=settings.gemini_model_acte,
        model_boost=settings.gemini_model_boost,
        index_max_pages=settings.index_max_pages,
    )


@dataclass
class JobRunner:
    """The poller's handler: fetch the PDF, run its pipeline, record what it cost."""

    documents: DocumentStore
    client: GeminiClient
    config: PipelineConfig
    profiles: ProfileStore
    metrics: Metrics

    async def __call__(self, job: Job) -> JobResult:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(
            job_id=str(job.id), document_source=job.document_source, attempt=job.attempts
        ):
            log.info("job started", document_number=job.document_number)
            self.metrics.jobs_in_flight.labels(job.document_source).inc()
            try:
                pipeline = PIPELINES[job.document_source]
                pdf = await self.documents.fetch(job.document_source, job.supabase_path or "")
                result = await pipeline(job, pdf, self.client, self.config)
            except BaseException as exc:
                duration = time.monotonic() - started
                outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
                self.metrics.job_finished(job.document_source, outcome, duration)
                log.warning(
                    "job ended without result",
                    outcome=outcome,
                    error=f"{type(exc).__name__}: {exc}",
                    duration_s=round(duration, 3),
                )
                raise
            finally:
                self.metrics.jobs_in_flight.labels(job.document_source).dec()
            profile = result.profile
            self.metrics.job_finished(job.document_source, "done", profile.duration_s)
            await self.profiles.record(profile)
            log.info(
                "job done",
                pages=profile.pages,
                calls=profile.calls,
                retries=profile.retries,
                rate_limited=profile.rate_limited,
                input_tokens=profile.input_tokens,
                output_tokens=profile.output_tokens,
                limiter_wait_s=profile.limiter_wait_s,
                duration_s=profile.duration_s,
            )
            return JobResult(
                file_content=result.file_content,
                boosted_file_content=result.boosted_file_content,
            )


async def _status_lines(limiter: Limiter, models: list[str], every_s: float) -> None:
    """A periodic line with what the limiter sees: the operator's first glance."""
    while True:
        await asyncio.sleep(every_s)
        for model in models:
            usage = await limiter.usage(model=model)
            log.info(
                "limiter status",
                model=model,
                rpm_used=usage.requests,
                tpm_used=usage.tokens,
                rpm_pct=round(100 * usage.requests / max(1, usage.budget.rpm), 1),
                tpm_pct=round(100 * usage.tokens / max(1, usage.budget.tpm), 1),
                effective_rpm=usage.effective_rpm,
                effective_tpm=usage.effective_tpm,
                paused_for_s=usage.paused_for_s,
                booked_requests=usage.booked_requests,
                booked_tokens=usage.booked_tokens,
                margin_tokens=usage.margin_tokens,
            )


async def run_worker(settings: Settings) -> int:
    """Run one worker process until SIGTERM/SIGINT; the exit status for the supervisor."""
    if settings.database_url is None:
        raise ConfigurationError("DATABASE_URL", "required to run a worker")
    if not settings.gemini_api_key:
        raise ConfigurationError("GEMINI_API_KEY", "required to run a worker")
    documents_store = open_documents(
        settings.documents_url,
        settings.supabase_service_key,
        max_bytes=settings.documents_max_bytes,
    )
    if settings.redis_url is None:
        log.warning(
            "REDIS_URL is unset: the limiter is in-process; run ONE worker process only, "
            "or the fleet will exceed the Gemini quota"
        )
    default_budget, model_budgets = fleet_budget(settings)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(documents_store.aclose)
        limiter = await create_limiter(
            settings.redis_url,
            default_budget,
            namespace=settings.redis_namespace,
            max_inflight=settings.gemini_max_inflight,
            lane_shares=settings.gemini_lane_shares or None,
            model_budgets=model_budgets or None,
            rpd=(
                math.floor(settings.gemini_rpd_limit * settings.gemini_safety_factor)
                if settings.gemini_rpd_limit
                else None
            ),
        )
        stack.push_async_callback(limiter.aclose)
        estimates: EstimateStore
        profiles: ProfileStore
        if settings.redis_url is not None:
            # A bounded pool: hundreds of jobs must not open hundreds of connections.
            shared = aioredis.Redis.from_pool(
                aioredis.BlockingConnectionPool.from_url(
                    settings.redis_url, max_connections=16, timeout=2.0, socket_timeout=2.0
                )
            )
            stack.push_async_callback(shared.aclose)
            estimates = RedisEstimates(shared, settings.redis_namespace)
            profiles = RedisProfiles(shared, settings.redis_namespace)
        else:
            estimates, profiles = MemoryEstimates(), MemoryProfiles()
        client = GeminiClient(
            api_key=settings.gemini_api_key,
            base_url=settings.gemini_base_url,
            limiter=limiter,
            estimates=estimates,
            tpm_counts=settings.gemini_tpm_counts,
            timeout_s=settings.gemini_timeout_s,
            max_inflight=settings.gemini_max_inflight,
        )
        stack.push_async_callback(client.aclose)
        store = await PostgresJobStore.connect(
            settings.database_url,
            statement_cache_size=settings.database_statement_cache_size,
        )
        stack.push_async_callback(store.close)
        models = sorted({settings.gemini_model_index, settings.gemini_model_acte,
                         settings.gemini_model_boost})  # fmt: skip
        metrics = Metrics(models=models)
        runner = JobRunner(documents_store, client, pipeline_config(settings), profiles, metrics)
        poller = Poller(
            store,
            runner,
            worker_id=settings.worker_id,
            worker_types=settings.worker_types,
            concurrency=settings.worker_concurrency,
            lease_s=settings.job_lease_s,
            poll_interval_s=settings.poll_interval_s,
            drain_s=settings.worker_drain_s,
        )
        metrics.watch(limiter=limiter, poller=poller, store=store)

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, poller.stop)
        stack.callback(loop.remove_signal_handler, signal.SIGINT)
        stack.callback(loop.remove_signal_handler, signal.SIGTERM)

        await limiter.register(settings.worker_id, list(settings.worker_types))
        stack.push_async_callback(limiter.deregister, settings.worker_id)
        log.info(
            "worker started",
            worker_id=settings.worker_id,
            types=list(settings.worker_types),
            concurrency=settings.worker_concurrency,
            budget_rpm=default_budget.rpm,
            budget_tpm=default_budget.tpm,
            window_s=default_budget.window_s,
        )
        async with asyncio.TaskGroup() as group:
            side = [
                group.create_task(_status_lines(limiter, models, STATUS_EVERY_S), name="status"),
                group.create_task(metrics.refresh_forever(), name="metrics refresh"),
            ]
            if settings.metrics_port is not None:
                side.append(
                    group.create_task(serve_metrics(metrics, settings.metrics_port), name="metrics")
                )
            await poller.run()
            for task in side:
                task.cancel()
        log.info("worker stopped", worker_id=settings.worker_id, **vars(poller.stats))
    return 0
