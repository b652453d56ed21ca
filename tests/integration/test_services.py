"""The embedded servers start, serve, restart and stop for real."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import redis

from runtime.services import LocalRedis, local_services


async def _pg_answers(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval("SELECT 41 + 1"))
    finally:
        await connection.close()


def test_local_services_start_and_stop() -> None:
    with local_services(None, None) as urls:
        assert urls.redis_url is not None
        client = redis.Redis.from_url(urls.redis_url)
        assert client.ping()
        client.close()
        assert asyncio.run(_pg_answers(urls.database_url)) == 42
    try:
        redis.Redis.from_url(urls.redis_url, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pass
    else:
        raise AssertionError("redis still answers after the block")


def test_configured_urls_are_used_as_they_are() -> None:
    with local_services("redis://cache:6379/0", "postgresql://db/x") as urls:
        assert urls.redis_url == "redis://cache:6379/0"
        assert urls.database_url == "postgresql://db/x"


def test_redis_can_be_killed_and_restarted_on_the_same_port(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path)
    server.start()
    port = server.port
    server.kill()
    assert not server.running
    server.start()
    assert server.port == port
    assert redis.Redis.from_url(server.url).ping()
    server.stop()


_ORPHAN_SCRIPT = """
import sys, time
from runtime.services import local_services
with local_services(None, None) as urls:
    print(urls.redis_url, urls.database_url, flush=True)
    time.sleep(600)
"""


def test_servers_die_with_a_parent_that_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    with parent.stdout:
        redis_url, database_url = parent.stdout.readline().split()
    assert asyncio.run(_pg_answers(database_url)) == 42
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=0.5).ping()
        except redis.ConnectionError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("redis outlived its killed parent")
    while time.monotonic() < deadline:
        try:
            asyncio.run(_pg_answers(database_url))
        except OSError:
            return
        time.sleep(0.2)
    raise AssertionError("postgres outlived its killed parent")
