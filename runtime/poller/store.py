"""The ``JobStore`` port of the poller and its Postgres adapter.

The store owns every read and write of ``extraction_queue`` and ``ocr_worker_leases``.
Each method is one short statement (the recovery sweep: one short transaction), so no
transaction is ever held while a document is processed. The SQL lives in
``queries.sql``, parsed once at import.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import structlog

from runtime.poller.jobs import (
    DONE,
    FAILED,
    FOREIGN_CLAIM_TIMEOUT_S,
    READY,
    Job,
    JobResult,
    Recovery,
    StoreUnavailableError,
)
from runtime.poller.memory import MemoryJobStore

__all__ = ["QUERIES", "READY_CHANNEL", "JobStore", "MemoryJobStore", "PostgresJobStore"]

log = structlog.get_logger()

# Channel of the optional trigger installed by ``db migrate --notify`` (notify.sql).
READY_CHANNEL = "extraction_queue_ready"

# Key of the fleet-wide advisory lock that lets one recovery sweep run at a time.
_SWEEP_LOCK = 0x4F43_5253_5745_4550  # "OCRSWEEP"

# Lease rows of processes silent for this long are dropped (kept before for the monitor).
_FORGET_LEASES_AFTER_S = 3600.0

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def _parse_queries(text: str) -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if len(queries) != len(parts[1::2]):
        raise ValueError("queries.sql names a query twice")
    return queries


QUERIES: Mapping[str, str] = _parse_queries(
    resources.files("runtime.poller").joinpath("queries.sql").read_text(encoding="utf-8")
)

# What a lost or refused connection looks like from asyncpg: the operation may be retried
# once Postgres is back. Anything else is a bug or a schema problem and propagates.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, and TimeoutError (a subclass)
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a connection left in a broken protocol state
)


async def _keep_session(connection: Any) -> None:
    """Skip asyncpg's reset on release: a round trip per statement, and nothing to reset.

    The store leaves no session state behind: no SET, advisory locks are transaction
    scoped, and LISTEN lives on its own connection.
    """


class JobStore(Protocol):
    """Where the poller claims jobs, writes their outcome and keeps its lease.

    ``StoreUnavailableError`` means the store cannot be reached; every write is fenced
    and idempotent, so the caller may simply try again later.
    """

    async def heartbeat(self, worker_id: str, worker_types: Sequence[str], lease_s: float) -> None:
        """Create or renew this process's lease, on the store's clock."""
        ...

    async def drop_lease(self, worker_id: str) -> None:
        """Remove the lease of a process that stops cleanly."""
        ...

    async def claim_batch(
        self, worker_id: str, worker_types: Sequence[str], limit: int
    ) -> list[Job]:
        """Claim up to ``limit`` ready rows, types interleaved in the order given."""
        ...

    async def complete(self, job: Job, result: JobResult) -> bool:
        """Write a result; False when the claim was lost (nothing written)."""
        ...

    async def fail(self, job: Job, error: str, *, permanent: bool, backoff_s: float) -> int | None:
        """Record a failure; the new status (3 or 4), or None when the claim was lost."""
        ...

    async def hand_back(self, job: Job) -> bool:
        """Return an unfinished job to ready, attempt not counted; False if lost."""
        ...

    async def recover(
        self, *, grace_s: float, foreign_after_s: float = FOREIGN_CLAIM_TIMEOUT_S
    ) -> Recovery | None:
        """Put back rows of lost workers; None when another sweep is running.

        Rows claimed by another system (no claim id) wait ``foreign_after_s``.
        """
        ...

    async def queue_depth(self) -> dict[tuple[int, str], int]:
        """Row counts by (status_id, document_source)."""
        ...

    async def listen(self, on_ready: Callable[[], None]) -> bool:
        """Call ``on_ready`` when rows become ready; False when the store cannot tell."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _job(row: Any, claim_id: uuid.UUID) -> Job:
    return Job(
        id=row["id"],
        document_source=row["document_source"],
        document_number=row["document_number"],
        supabase_path=row["supabase_path"],
        circonscription_fonciere=row["circonscription_fonciere"],
        cadastre=row["cadastre"],
        acte_type=row["acte_type"],
        attempts=row["ocr_attempts"],
        max_attempts=row["ocr_max_attempts"],
        claim_id=claim_id,
    )


class PostgresJobStore:
    """``JobStore`` on asyncpg, for the extractor's Postgres (or Supabase)."""

    def __init__(self, pool: Any, connect_kwargs: Mapping[str, Any]) -> None:
        self._pool = pool
        self._connect_kwargs = dict(connect_kwargs)
        self._host = socket.gethostname()
        self._pid = os.getpid()
        # Claims whose answer was lost with the connection; released before the next one.
        self._uncertain_claims: list[uuid.UUID] = []
        self._listener: Any = None
        self._on_ready: Callable[[], None] | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        statement_cache_size: int = 100,
        max_connections: int = 10,
        command_timeout_s: float | None = None,
    ) -> PostgresJobStore:
        """Open a pool on ``dsn``.

        ``statement_cache_size=0`` disables prepared-statement caching, which
        transaction-mode poolers (PgBouncer, the Supabase pooler) require. Lost
        connections are reopened by the pool on next use, so the store carries on after
        a Postgres restart once the caller retries. Callers bound each call with their
        own timeout (the poller does); ``command_timeout_s`` adds asyncpg's, which costs
        more per statement than the statement itself on a fast network.
        """
        kwargs: dict[str, Any] = {
            "statement_cache_size": statement_cache_size,
            "command_timeout": command_timeout_s,
        }
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_connections, reset=_keep_session, **kwargs
            )
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailableError(f"cannot reach the queue database: {exc}") from exc
        return cls(pool, {"dsn": dsn, **kwargs})

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as connection:
                try:
                    yield connection
                except BaseException:
                    # A call cut short (timeout, cancellation, lost server) may leave the
                    # connection mid-operation; as the pool skips its reset, it must not
                    # be handed out again.
                    connection.terminate()
                    raise
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailableError(f"queue database unavailable: {exc}") from exc

    async def heartbeat(self, worker_id: str, worker_types: Sequence[str], lease_s: float) -> None:
        async with self._connection() as connection:
            await connection.execute(
                QUERIES["heartbeat"], worker_id, list(worker_types), self._host, self._pid, lease_s
            )
        await self._keep_listening()

    async def drop_lease(self, worker_id: str) -> None:
        async with self._connection() as connection:
            await connection.execute(QUERIES["drop_lease"], worker_id)

    async def claim_batch(
        self, worker_id: str, worker_types: Sequence[str], limit: int
    ) -> list[Job]:
        if limit <= 0 or not worker_types:
            return []
        claim_id = uuid.uuid4()
        async with self._connection() as connection:
            while self._uncertain_claims:
                released = await connection.execute(
                    QUERIES["release_claim"], self._uncertain_claims[0]
                )
                log.info("uncertain claim released", claim_id=str(self._uncertain_claims[0]),
                         result=released)  # fmt: skip
                self._uncertain_claims.pop(0)
            try:
                rows = await connection.fetch(
                    QUERIES["claim_batch"], worker_id, list(worker_types), limit, claim_id
                )
            except _CONNECTION_ERRORS:
                # The statement may have committed without us seeing its rows.
                self._uncertain_claims.append(claim_id)
                raise
            except asyncio.CancelledError:
                self._uncertain_claims.append(claim_id)
                raise
        rows = sorted(rows, key=lambda row: row["created_at"])
        return [_job(row, claim_id) for row in rows]

    async def complete(self, job: Job, result: JobResult) -> bool:
        async with self._connection() as connection:
            if await connection.fetchval(
                QUERIES["complete"],
                job.id,
                job.claim_id,
                result.file_content,
                result.boosted_file_content,
            ):
                return True
            outcome = await connection.fetchrow(QUERIES["claim_outcome"], job.id, job.claim_id)
        return outcome is not None and outcome["status_id"] == DONE

    async def fail(self, job: Job, error: str, *, permanent: bool, backoff_s: float) -> int | None:
        async with self._connection() as connection:
            status = await connection.fetchval(
                QUERIES["fail"], job.id, job.claim_id, error, permanent, float(backoff_s)
            )
            if status is not None:
                return int(status)
            outcome = await connection.fetchrow(QUERIES["claim_outcome"], job.id, job.claim_id)
        if outcome is None or outcome["status_id"] not in (READY, FAILED):
            return None
        return int(outcome["status_id"]) if outcome["ocr_error"] == error else None

    async def hand_back(self, job: Job) -> bool:
        async with self._connection() as connection:
            if await connection.fetchval(QUERIES["hand_back"], job.id, job.claim_id):
                return True
            outcome = await connection.fetchrow(QUERIES["claim_outcome"], job.id, job.claim_id)
        return outcome is not None and outcome["status_id"] == READY

    async def recover(
        self, *, grace_s: float, foreign_after_s: float = FOREIGN_CLAIM_TIMEOUT_S
    ) -> Recovery | None:
        async with self._connection() as connection, connection.transaction():
            if not await connection.fetchval(QUERIES["try_sweep_lock"], _SWEEP_LOCK):
                return None
            rows = await connection.fetch(
                QUERIES["recover"], float(grace_s), float(foreign_after_s)
            )
            await connection.execute(QUERIES["forget_dead_leases"], _FORGET_LEASES_AFTER_S)
        failed = sum(1 for row in rows if row["status_id"] == 4)
        return Recovery(requeued=len(rows) - failed, failed=failed)

    async def queue_depth(self) -> dict[tuple[int, str], int]:
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["queue_depth"])
        return {(row["status_id"], row["document_source"]): row["rows"] for row in rows}

    async def listen(self, on_ready: Callable[[], None]) -> bool:
        self._on_ready = on_ready
        return await self._keep_listening()

    async def _keep_listening(self) -> bool:
        """(Re)open the LISTEN connection; wake-ups are a bonus, polling stays the rule."""
        if self._on_ready is None:
            return False
        if self._listener is not None and not self._listener.is_closed():
            return True
        on_ready = self._on_ready

        def notified(*_: object) -> None:
            on_ready()

        try:
            listener = await asyncpg.connect(**self._connect_kwargs)
        except _CONNECTION_ERRORS as exc:
            log.debug("queue notifications unavailable", error=str(exc))
            return False
        try:
            await listener.add_listener(READY_CHANNEL, notified)
        except BaseException:
            await listener.close()
            raise
        self._listener = listener
        return True

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(*_CONNECTION_ERRORS):
                await listener.close(timeout=5)
        await self._pool.close()
