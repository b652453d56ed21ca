"""The operator commands against real Redis and Postgres: capacity and monitor."""

from __future__ import annotations

import json

import asyncpg
import redis.asyncio as aioredis
from conftest import CommandRunner

from runtime.ops.profiles import RedisProfiles
from runtime.pipelines.common import Profile

SEED_ENV = {"GEMINI_TPM_COUNTS": "total", "WORKER_CONCURRENCY": "1", "GEMINI_SAFETY_FACTOR": "0.8"}


def test_capacity_reproduces_the_design_notes_production_table(run_cli: CommandRunner) -> None:
    result = run_cli("capacity", "--target", "0.8", **SEED_ENV)
    assert result.returncode == 0, result.stderr
    production = next(line for line in result.stdout.splitlines() if "production" in line)
    cells = [cell.strip() for cell in production.split("│") if cell.strip()]
    assert cells == ["production", "5", "10", "105", "6.6%", "2.69M", "42.1%"]
    assert "largest at 80%" in result.stdout


async def test_capacity_follows_the_profiles_the_fleet_measured(
    redis_url: str, run_cli: CommandRunner
) -> None:
    client = aioredis.from_url(redis_url)
    try:
        profiles = RedisProfiles(client, "gemini")
        for _ in range(10):  # actes twice as slow as the design note says
            await profiles.record(
                Profile("acte", pages=4, calls=3, retries=0, rate_limited=0, input_tokens=30_000,
                        output_tokens=71_000, limiter_wait_s=0.0, duration_s=50)
            )  # fmt: skip
    finally:
        await client.aclose()
    result = run_cli("capacity", REDIS_URL=redis_url, **SEED_ENV)
    assert result.returncode == 0, result.stderr
    assert "measured (10 jobs)" in result.stdout
    production = next(line for line in result.stdout.splitlines() if "production" in line)
    assert "105" not in production  # 5 index + 10 slower actes: 33 + 36 RPM
    assert " 69 " in production


async def test_monitor_reports_json_and_alerts_on_a_queue_without_workers(
    redis_url: str, database_url: str, run_cli: CommandRunner
) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO extraction_queue (document_source, status_id) VALUES"
            " ('index', 3), ('index', 3), ('acte', 3), ('acte', 5)"
        )
    finally:
        await connection.close()
    result = run_cli("monitor", "--json", REDIS_URL=redis_url, DATABASE_URL=database_url)
    assert result.returncode == 2, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["queue"]["ready"] == {"acte": 1, "index": 2}
    assert snapshot["queue"]["done"] == {"acte": 1}
    assert snapshot["workers"] == {}
    assert any("no live worker" in alert for alert in snapshot["alerts"])
    models = {view["model"] for view in snapshot["models"]}
    assert models == {"gemini-2.5-flash", "gemini-2.5-pro"}


def test_monitor_needs_redis(run_cli: CommandRunner) -> None:
    result = run_cli("monitor", "--once")
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr
