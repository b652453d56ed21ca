"""The operator commands: ``monitor`` and ``capacity``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from runtime.errors import ConfigurationError, ServiceError
from runtime.limiter import Limiter, create_limiter
from runtime.ops.capacity import (
    FleetRow,
    Quota,
    advise,
    largest_fleet,
    reference_table,
    worker_load,
)
from runtime.ops.monitor import Snapshot, render, sleep_until_next, take_snapshot
from runtime.ops.profiles import RedisProfiles, averages
from runtime.poller import PostgresJobStore
from runtime.settings import Settings
from runtime.worker import fleet_budget

ALERT_EXIT = 2


def configure_monitor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh every N seconds")


def configure_capacity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=float, default=None,
                        help="print the largest fleet that stays under this fraction")  # fmt: skip
    parser.add_argument("--mix", default="1:2", help="index:acte proportions (default 1:2)")
    parser.add_argument("--advise", action="store_true",
                        help="recommend workers to add or remove for the queue")  # fmt: skip
    parser.add_argument("--drain-within", type=float, default=3600.0,
                        help="seconds in which the queue should drain (with --advise)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=None,
                        help="jobs per worker process (default WORKER_CONCURRENCY)")  # fmt: skip


def _models(settings: Settings) -> list[str]:
    return sorted(
        {settings.gemini_model_index, settings.gemini_model_acte, settings.gemini_model_boost}
        | set(settings.gemini_model_limits)
    )


@contextlib.asynccontextmanager
async def _observer(settings: Settings) -> AsyncIterator[Limiter]:
    """A limiter that only looks: it never registers and never admits."""
    if settings.redis_url is None:
        raise ConfigurationError("REDIS_URL", "the monitor reads the fleet's state in Redis")
    budget, model_budgets = fleet_budget(settings)
    limiter = await create_limiter(
        settings.redis_url,
        budget,
        namespace=settings.redis_namespace,
        lane_shares=settings.gemini_lane_shares or None,
        model_budgets=model_budgets or None,
    )
    try:
        yield limiter
    finally:
        await limiter.aclose()


@contextlib.asynccontextmanager
async def _queue(settings: Settings) -> AsyncIterator[PostgresJobStore | None]:
    if settings.database_url is None:
        yield None
        return
    store = await PostgresJobStore.connect(
        settings.database_url,
        statement_cache_size=settings.database_statement_cache_size,
        max_connections=1,
    )
    try:
        yield store
    finally:
        await store.close()


async def _snapshot(
    settings: Settings, limiter: Limiter, store: PostgresJobStore | None
) -> Snapshot:
    depth = None
    if store is not None:
        with contextlib.suppress(Exception):  # a monitor shows what it can
            depth = await store.queue_depth()
    return await take_snapshot(settings, limiter, _models(settings), depth)


async def _monitor(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    async with _observer(settings) as limiter, _queue(settings) as store:
        if args.once or args.json:
            snapshot = await _snapshot(settings, limiter, store)
            if args.json:
                print(json.dumps(snapshot.to_json(), indent=2))
            else:
                console.print(render(snapshot))
            return ALERT_EXIT if snapshot.alerts else 0
        snapshot = await _snapshot(settings, limiter, store)
        with Live(render(snapshot), console=console, refresh_per_second=4) as live:
            while True:
                await sleep_until_next(args.interval)
                snapshot = await _snapshot(settings, limiter, store)
                live.update(render(snapshot))


def run_monitor(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_monitor(args, settings))
    except KeyboardInterrupt:
        return 0


async def _measured_sums(settings: Settings) -> dict[str, dict[str, float]]:
    if settings.redis_url is None:
        return {}
    client = aioredis.from_url(settings.redis_url, socket_timeout=2.0)
    try:
        return await RedisProfiles(client, settings.redis_namespace).sums()
    except (OSError, aioredis.RedisError) as exc:
        raise ServiceError(f"cannot read job profiles from Redis: {exc}") from exc
    finally:
        await client.aclose()


async def _live_and_queue(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    live: dict[str, int] = {}
    if settings.redis_url is not None:
        async with _observer(settings) as limiter:
            live = {kind: len(ids) for kind, ids in (await limiter.live_workers()).items()}
    queued: dict[str, int] = {}
    async with _queue(settings) as store:
        if store is None:
            raise ConfigurationError("DATABASE_URL", "--advise reads the queue depth")
        for (status, source), rows in (await store.queue_depth()).items():
            if status == 3:
                queued[source] = queued.get(source, 0) + rows
    return live, queued


def _fleet_table(title: str, rows: list[FleetRow], tpm_label: str) -> Table:
    table = Table(title=title)
    for column in ("fleet", "index", "acte", "RPM", "% RPM", tpm_label, "% TPM"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.name,
            str(row.workers.get("index", 0)),
            str(row.workers.get("acte", 0)),
            f"{row.load.rpm:,.0f}",
            f"{row.rpm_share:.1%}",
            f"{row.load.tpm / 1e6:,.2f}M",
            f"{row.tpm_share:.1%}",
        )
    return table


def run_capacity(args: argparse.Namespace, settings: Settings) -> int:
    concurrency = args.concurrency or settings.worker_concurrency
    try:
        index_part, acte_part = (int(p) for p in args.mix.split(":"))
    except ValueError:
        raise ConfigurationError(
            "--mix", f"expected INDEX:ACTE such as 1:2, got {args.mix!r}"
        ) from None
    profiles = averages(asyncio.run(_measured_sums(settings)))
    counts = settings.gemini_tpm_counts
    per_worker = {
        source: worker_load(profile, concurrency=concurrency, tpm_counts=counts)
        for source, profile in profiles.items()
    }
    quota = Quota(settings.gemini_rpm_limit, settings.gemini_tpm_limit,
                  settings.gemini_safety_factor, counts)  # fmt: skip
    console = Console()
    per = Table(title=f"One worker ({concurrency} job(s) at a time)")
    for column in ("type", "source", "calls/job", "tokens/job", "s/job", "RPM", f"TPM ({counts})"):
        per.add_column(column, justify="right")
    for source, profile in sorted(profiles.items()):
        load = per_worker[source]
        origin = f"measured ({profile.jobs} jobs)" if profile.jobs else "design note"
        per.add_row(source, origin, f"{profile.calls:.1f}", f"{profile.tokens:,.0f}",
                    f"{profile.duration_s:.0f}", f"{load.rpm:.1f}", f"{load.tpm:,.0f}")  # fmt: skip
    console.print(per)
    budget = quota.budget
    title = (f"Fleets against the budget: {budget.rpm:,.0f} RPM, {budget.tpm / 1e6:,.2f}M TPM "
             f"({settings.gemini_safety_factor:.0%} of the quota)")  # fmt: skip
    rows = reference_table(per_worker, quota)
    if args.target is not None:
        rows.append(largest_fleet(per_worker, quota, target=args.target,
                                  mix={"index": index_part, "acte": acte_part}))  # fmt: skip
    console.print(_fleet_table(title, rows, f"TPM ({counts})"))
    if args.advise:
        live, queued = asyncio.run(_live_and_queue(settings))
        advice = advise(queued=queued, live=live, profiles=profiles, per_worker=per_worker,
                        quota=quota, drain_within_s=args.drain_within, concurrency=concurrency,
                        target=args.target or settings.monitor_alert_at)  # fmt: skip
        table = Table(title=f"To drain the ready queue within {args.drain_within:,.0f} s")
        for column in ("type", "ready", "live", "needed", "change", "note"):
            table.add_column(column, justify="right")
        for item in advice:
            note = "capped by the quota" if item.limited_by_quota else ""
            table.add_row(item.source, str(item.queued), str(item.live), str(item.needed),
                          f"{item.change:+d}", note)  # fmt: skip
        console.print(table)
    return 0
