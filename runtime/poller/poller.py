"""The claim loop of one worker process: slots, leases, recovery, outcomes, shutdown.

A ``Poller`` claims ready rows in batches no larger than its free slots, runs the handler
of each job in a task, writes the outcome with a fenced update, and keeps the process's
lease alive on the database clock. Its side loop also sweeps the rows of lost workers,
one sweep at a time across the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import structlog
from structlog.contextvars import bound_contextvars

from runtime.errors import ConfigurationError, PermanentError, TransientError
from runtime.poller.jobs import (
    FAILED,
    NEVER_CLAIMED,
    Job,
    JobResult,
    StoreUnavailableError,
    backoff_s,
    error_text,
)
from runtime.poller.store import JobStore

__all__ = ["Handler", "Poller", "PollerStats"]

log = structlog.get_logger()

Handler = Callable[[Job], Awaitable[JobResult]]

_T = TypeVar("_T")

# Reconnection backoff while the store is unreachable: quick first retries (a restart
# takes a second or two), capped so that a long outage costs few useless attempts.
_RECONNECT_BASE_S = 0.1
_RECONNECT_MAX_S = 5.0
# A hand-back runs while the process is stopping: it gets a short, bounded chance.
_HAND_BACK_TIMEOUT_S = 5.0
# Heartbeats per lease: the lease row expires after (1 - 1/n) of the configured lease
# and the sweep runs every 1/n, so a dead process loses its rows within the lease, and a
# live one tolerates a couple of missed heartbeats.
_BEATS_PER_LEASE = 4
# Event-loop turns to wait after a slot frees before claiming (see _refill_pause).
_COALESCE_TURNS = 3


@dataclass(frozen=True)
class PollerStats:
    """Counters since the poller started, for metrics and the monitor (``vars()`` works)."""

    claimed: int = 0
    done: int = 0
    failed: int = 0
    """Jobs that ended in 4 (permanent error or attempts used up)."""
    retried: int = 0
    """Jobs that failed and went back to 3 with a backoff."""
    handed_back: int = 0
    lost_leases: int = 0
    """Outcomes dropped because the row was no longer ours."""
    recovered: int = 0
    """Rows of lost workers put back by this process's sweeps."""
    in_flight: int = 0


class Poller:
    """Claims and runs jobs for one process until ``stop()``; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        handler: Handler,
        *,
        worker_id: str,
        worker_types: Sequence[str],
        concurrency: int,
        lease_s: float = 60.0,
        poll_interval_s: float = 2.0,
        drain_s: float = 30.0,
        backoff_base_s: float = 30.0,
        backoff_max_s: float = 900.0,
        io_timeout_s: float = 15.0,
        rng: random.Random | None = None,
    ) -> None:
        types = [t for t in dict.fromkeys(worker_types) if t != NEVER_CLAIMED]
        if not types:
            raise ConfigurationError("WORKER_TYPES", "no document type to OCR (index, acte)")
        if concurrency < 1:
            raise ConfigurationError("CONCURRENCY", "must be at least 1")
        if lease_s <= 0 or poll_interval_s <= 0 or drain_s < 0:
            raise ConfigurationError("JOB_LEASE_S", "lease and intervals must be positive")
        self._store = store
        self._handler = handler
        self.worker_id = worker_id
        self.worker_types: tuple[str, ...] = tuple(types)
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._drain_s = drain_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._io_timeout_s = io_timeout_s
        self._rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._jobs: dict[UUID, asyncio.Task[None]] = {}
        self._last_claim_full = False
        self._round = 0
        self._counts: dict[str, int] = dict.fromkeys(
            ("claimed", "done", "failed", "retried", "handed_back", "lost_leases", "recovered"), 0
        )

    # -- public ------------------------------------------------------------------------------

    @property
    def stats(self) -> PollerStats:
        return PollerStats(**self._counts, in_flight=len(self._jobs))

    def stop(self) -> None:
        """Stop claiming; jobs in flight get ``drain_s`` to finish, the rest are handed back."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs until ``stop()``, then drain and release the lease."""
        log.info("poller starting", worker_id=self.worker_id, types=list(self.worker_types))
        try:
            if not await self._first_heartbeat():
                return
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                await self._store.listen(self._on_ready)
            async with asyncio.TaskGroup() as group:
                lease = group.create_task(self._keep_lease(), name=f"lease {self.worker_id}")
                await self._claim_loop(group)
                await self._drain()
                # The lease must outlive the jobs: a running job is never left unrenewed.
                lease.cancel()
        finally:
            await self._release_lease()
            log.info("poller stopped", worker_id=self.worker_id, **self._counts)

    # -- claiming ------------------------------------------------------------------------------

    def _on_ready(self) -> None:
        if len(self._jobs) < self._concurrency:
            self._wake.set()

    def _turn_order(self) -> list[str]:
        # Rotating which type goes first gives each type the odd slot in turn, so a batch
        # of one alternates between index and acte instead of always taking the oldest.
        shift = self._round % len(self.worker_types)
        self._round += 1
        return [*self.worker_types[shift:], *self.worker_types[:shift]]

    async def _claim_loop(self, group: asyncio.TaskGroup) -> None:
        outage = 0
        while not self._stopping.is_set():
            self._wake.clear()
            free = self._concurrency - len(self._jobs)
            if free > 0:
                try:
                    jobs = await self._call(
                        functools.partial(
                            self._store.claim_batch, self.worker_id, self._turn_order(), free
                        )
                    )
                except StoreUnavailableError as exc:
                    outage += 1
                    log.warning("claim failed, store unavailable", error=str(exc))
                    await self._pause(self._reconnect_delay(outage))
                    continue
                outage = 0
                self._counts["claimed"] += len(jobs)
                self._last_claim_full = len(jobs) == free
                for job in jobs:
                    task = group.create_task(self._run_job(job), name=str(job.id))
                    self._jobs[job.id] = task
                    # A done callback, not a finally: a task cancelled before its first
                    # step never runs its body.
                    task.add_done_callback(functools.partial(self._slot_freed, job.id))
                if self._last_claim_full:
                    # More work is likely waiting: claim again as soon as a slot frees.
                    await self._refill_pause()
                    continue
            elif self._last_claim_full:
                await self._refill_pause()
                continue
            jitter = self._rng.uniform(0.75, 1.25)
            await self._pause(self._poll_interval_s * jitter)

    async def _refill_pause(self) -> None:
        await self._pause(None)
        # Jobs that end together free their slots within a few loop turns; letting those
        # turns run first makes one claim of several rows instead of several claims of one.
        for _ in range(_COALESCE_TURNS):
            await asyncio.sleep(0)

    async def _pause(self, timeout_s: float | None) -> None:
        """Sleep until woken (stop, freed slot after a full claim, notification) or timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _reconnect_delay(self, failures: int) -> float:
        step = min(_RECONNECT_MAX_S, _RECONNECT_BASE_S * 2.0 ** (failures - 1))
        return step * self._rng.uniform(0.5, 1.0)

    async def _call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """One store call under the I/O timeout; a timeout counts as unavailability."""
        try:
            async with asyncio.timeout(self._io_timeout_s):
                return await operation()
        except TimeoutError as exc:
            raise StoreUnavailableError("queue database did not answer in time") from exc

    async def _until_written(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Retry a fenced write until the store takes it: fencing makes retries safe."""
        outage = 0
        while True:
            try:
                return await self._call(operation)
            except StoreUnavailableError as exc:
                outage += 1
                log.warning("write failed, store unavailable", error=str(exc), tries=outage)
                await asyncio.sleep(self._reconnect_delay(outage))

    # -- jobs ----------------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        with bound_contextvars(
            job_id=str(job.id), document_source=job.document_source, attempt=job.attempts
        ):
            try:
                await self._handle(job)
            except asyncio.CancelledError:
                await self._hand_back(job)
                raise

    def _slot_freed(self, job_id: UUID, _: object = None) -> None:
        self._jobs.pop(job_id, None)
        if self._last_claim_full:
            self._wake.set()

    async def _handle(self, job: Job) -> None:
        log.debug("job started")
        try:
            result = await self._handler(job)
        except PermanentError as exc:
            await self._record_failure(job, exc, permanent=True)
        except Exception as exc:
            await self._record_failure(job, exc, permanent=False)
        else:
            if await self._until_written(lambda: self._store.complete(job, result)):
                self._counts["done"] += 1
                log.info("job done")
            else:
                self._lost(job)

    async def _record_failure(self, job: Job, exc: Exception, *, permanent: bool) -> None:
        message = error_text(exc)
        retry_after = exc.retry_after_s if isinstance(exc, TransientError) else None
        delay = backoff_s(
            job.attempts,
            base_s=self._backoff_base_s,
            max_s=self._backoff_max_s,
            rng=self._rng,
            at_least_s=retry_after,
        )
        status = await self._until_written(
            lambda: self._store.fail(job, message, permanent=permanent, backoff_s=delay)
        )
        known = isinstance(exc, TransientError | PermanentError)
        if status is None:
            self._lost(job)
        elif status == FAILED:
            self._counts["failed"] += 1
            log.error("job failed", error=message, permanent=permanent,
                      exc_info=None if known else exc)  # fmt: skip
        else:
            self._counts["retried"] += 1
            log.warning("job will be retried", error=message, retry_in_s=round(delay, 3),
                        exc_info=None if known else exc)  # fmt: skip

    def _lost(self, job: Job) -> None:
        self._counts["lost_leases"] += 1
        log.warning("outcome dropped: the row is no longer ours", claim_id=str(job.claim_id))

    async def _hand_back(self, job: Job) -> None:
        try:
            async with asyncio.timeout(_HAND_BACK_TIMEOUT_S):
                handed = await self._until_written(lambda: self._store.hand_back(job))
        except TimeoutError:
            # The sweep will put the row back once this lease expires.
            log.warning("hand-back timed out")
            return
        if handed:
            self._counts["handed_back"] += 1
            log.info("job handed back")

    async def _drain(self) -> None:
        if not self._jobs:
            return
        log.info("draining", in_flight=len(self._jobs), deadline_s=self._drain_s)
        late = set(self._jobs.values())
        if self._drain_s > 0:
            _, late = await asyncio.wait(late, timeout=self._drain_s)
        for task in late:
            task.cancel()
        # The task group waits for the cancelled jobs, and so for their hand-backs.

    # -- lease and recovery --------------------------------------------------------------------

    @property
    def _expiry_s(self) -> float:
        return self._lease_s * (1 - 1 / _BEATS_PER_LEASE)

    async def _beat(self) -> None:
        await self._store.heartbeat(self.worker_id, self.worker_types, self._expiry_s)

    async def _first_heartbeat(self) -> bool:
        """The lease must exist before the first claim, or a sweep could take our rows."""
        outage = 0
        while not self._stopping.is_set():
            try:
                await self._call(self._beat)
                return True
            except StoreUnavailableError as exc:
                outage += 1
                log.warning("cannot register the lease yet", error=str(exc))
                await self._pause(self._reconnect_delay(outage))
        return False

    async def _keep_lease(self) -> None:
        beat_s = self._lease_s / _BEATS_PER_LEASE
        outage = 0
        while True:
            try:
                await self._call(self._beat)
                recovery = await self._call(lambda: self._store.recover(grace_s=self._expiry_s))
            except StoreUnavailableError as exc:
                outage += 1
                log.warning("heartbeat failed", error=str(exc), tries=outage)
                await asyncio.sleep(min(self._reconnect_delay(outage), beat_s))
                continue
            outage = 0
            if recovery is not None and (recovery.requeued or recovery.failed):
                self._counts["recovered"] += recovery.requeued + recovery.failed
                log.warning("rows of lost workers recovered",
                            requeued=recovery.requeued, failed=recovery.failed)  # fmt: skip
                self._on_ready()
            await asyncio.sleep(beat_s * self._rng.uniform(0.8, 1.0))

    async def _release_lease(self) -> None:
        try:
            async with asyncio.timeout(_HAND_BACK_TIMEOUT_S):
                await self._store.drop_lease(self.worker_id)
        except (StoreUnavailableError, TimeoutError) as exc:
            # Harmless: the lease expires and is forgotten by a later sweep.
            log.warning("lease not released", error=str(exc))
