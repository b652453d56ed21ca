"""``MemoryJobStore``: the in-process twin of the Postgres job store.

It follows the same rules as ``queries.sql`` (status ids, fencing, attempts, backoff,
leases, fair interleaving) on plain objects, for the single-process mode and for tests.
Time comes from an injected clock, so tests move time instead of sleeping.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from runtime.poller.jobs import (
    DONE,
    FAILED,
    FOREIGN_CLAIM_TIMEOUT_S,
    IN_OCR,
    NEVER_CLAIMED,
    READY,
    Job,
    JobResult,
    Recovery,
)

__all__ = ["MemoryJobStore", "QueueRow"]

_insertion = itertools.count()


@dataclass
class QueueRow:
    """One ``extraction_queue`` row, with the columns the OCR runtime reads or writes."""

    document_source: str | None
    document_number: str | None = None
    supabase_path: str | None = None
    circonscription_fonciere: str | None = None
    cadastre: str | None = None
    acte_type: str | None = None
    status_id: int = READY
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: float = 0.0
    file_content: str | None = None
    boosted_file_content: str | None = None
    error_message: str | None = None
    ocr_worker_id: str | None = None
    ocr_started_at: float | None = None
    ocr_completed_at: float | None = None
    ocr_attempts: int = 0
    ocr_max_attempts: int = 3
    ocr_error: str | None = None
    ocr_last_error_at: float | None = None
    ocr_claim_id: uuid.UUID | None = None
    ocr_not_before: float | None = None
    updated_at: float = 0.0
    order: int = field(default_factory=lambda: next(_insertion))


@dataclass
class _Lease:
    worker_types: tuple[str, ...]
    lease_s: float
    heartbeat_at: float


class MemoryJobStore:
    """``JobStore`` on a dict of rows; ``clock`` is the store's "database clock"."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rows: dict[uuid.UUID, QueueRow] = {}
        self.leases: dict[str, _Lease] = {}
        self._listeners: list[Callable[[], None]] = []
        self._sweeping = False

    # -- test and single-process helpers ---------------------------------------------------

    def add(self, document_source: str | None, **columns: object) -> uuid.UUID:
        """Insert a row as the extractor would (ready by default); returns its id."""
        now = self.clock()
        row = QueueRow(document_source=document_source, created_at=now, updated_at=now)
        for name, value in columns.items():
            if not hasattr(row, name):
                raise AttributeError(f"extraction_queue has no column {name!r}")
            setattr(row, name, value)
        self.rows[row.id] = row
        if row.status_id == READY:
            self._notify()
        return row.id

    def add_many(self, document_source: str, count: int, **columns: object) -> list[uuid.UUID]:
        return [self.add(document_source, **columns) for _ in range(count)]

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # -- JobStore ------------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, worker_types: Sequence[str], lease_s: float) -> None:
        self.leases[worker_id] = _Lease(tuple(worker_types), lease_s, self.clock())

    async def drop_lease(self, worker_id: str) -> None:
        self.leases.pop(worker_id, None)

    async def claim_batch(
        self, worker_id: str, worker_types: Sequence[str], limit: int
    ) -> list[Job]:
        if limit <= 0:
            return []
        now = self.clock()
        per_type: list[list[QueueRow]] = []
        for source in dict.fromkeys(worker_types):
            if source == NEVER_CLAIMED:
                continue
            ready = [
                row
                for row in self.rows.values()
                if row.status_id == READY
                and row.document_source == source
                and (row.ocr_not_before is None or row.ocr_not_before <= now)
            ]
            ready.sort(key=lambda row: (row.created_at, row.order))
            per_type.append(ready[:limit])
        # Turn by turn across the types, in the order given: the same as the SQL.
        chosen = [row for turn in itertools.zip_longest(*per_type) for row in turn if row][:limit]
        claim_id = uuid.uuid4()
        jobs = []
        for row in sorted(chosen, key=lambda row: (row.created_at, row.order)):
            row.status_id = IN_OCR
            row.ocr_worker_id = worker_id
            row.ocr_started_at = now
            row.ocr_completed_at = None
            row.ocr_attempts += 1
            row.ocr_claim_id = claim_id
            row.updated_at = now
            jobs.append(
                Job(
                    id=row.id,
                    document_source=row.document_source or "",
                    document_number=row.document_number,
                    supabase_path=row.supabase_path,
                    circonscription_fonciere=row.circonscription_fonciere,
                    cadastre=row.cadastre,
                    acte_type=row.acte_type,
                    attempts=row.ocr_attempts,
                    max_attempts=row.ocr_max_attempts,
                    claim_id=claim_id,
                )
            )
        return jobs

    def _owned(self, job: Job) -> QueueRow | None:
        row = self.rows.get(job.id)
        if row is None or row.status_id != IN_OCR or row.ocr_claim_id != job.claim_id:
            return None
        return row

    def _already(self, job: Job, *statuses: int) -> QueueRow | None:
        """The row, if this claim already moved it to one of ``statuses`` (a retried write)."""
        row = self.rows.get(job.id)
        if row is None or row.ocr_claim_id != job.claim_id or row.status_id not in statuses:
            return None
        return row

    async def complete(self, job: Job, result: JobResult) -> bool:
        row = self._owned(job)
        if row is None:
            return self._already(job, DONE) is not None
        now = self.clock()
        row.status_id = DONE
        row.file_content = result.file_content
        row.boosted_file_content = result.boosted_file_content
        row.ocr_completed_at = now
        row.ocr_error = None
        row.ocr_not_before = None
        row.updated_at = now
        return True

    async def fail(self, job: Job, error: str, *, permanent: bool, backoff_s: float) -> int | None:
        row = self._owned(job)
        if row is None:
            retried = self._already(job, READY, FAILED)
            return retried.status_id if retried and retried.ocr_error == error else None
        now = self.clock()
        if permanent or row.ocr_attempts >= row.ocr_max_attempts:
            row.status_id = FAILED
            row.ocr_not_before = None
        else:
            row.status_id = READY
            row.ocr_not_before = now + backoff_s
        row.ocr_error = error
        row.ocr_last_error_at = now
        row.updated_at = now
        return row.status_id

    async def hand_back(self, job: Job) -> bool:
        row = self._owned(job)
        if row is None:
            return self._already(job, READY) is not None
        row.status_id = READY
        row.ocr_attempts = max(row.ocr_attempts - 1, 0)
        row.ocr_not_before = None
        row.updated_at = self.clock()
        self._notify()
        return True

    def _lost(self, row: QueueRow, now: float, grace_s: float, foreign_after_s: float) -> bool:
        lease = self.leases.get(row.ocr_worker_id or "")
        if lease is None:
            wait = grace_s if row.ocr_claim_id is not None else foreign_after_s
            return row.ocr_started_at is None or row.ocr_started_at < now - wait
        return lease.heartbeat_at < now - lease.lease_s

    async def recover(
        self, *, grace_s: float, foreign_after_s: float = FOREIGN_CLAIM_TIMEOUT_S
    ) -> Recovery | None:
        if self._sweeping:
            return None
        self._sweeping = True
        try:
            now = self.clock()
            requeued = failed = 0
            for row in self._in_ocr():
                if not self._lost(row, now, grace_s, foreign_after_s):
                    continue
                if row.ocr_attempts >= row.ocr_max_attempts:
                    row.status_id = FAILED
                    row.ocr_error = (
                        f"worker lost: {row.ocr_worker_id or '?'} stopped renewing its lease"
                        " during the last attempt"
                    )
                    row.ocr_last_error_at = now
                    failed += 1
                else:
                    row.status_id = READY
                    requeued += 1
                row.updated_at = now
            if requeued:
                self._notify()
            return Recovery(requeued=requeued, failed=failed)
        finally:
            self._sweeping = False

    def _in_ocr(self) -> Iterable[QueueRow]:
        return [row for row in self.rows.values() if row.status_id == IN_OCR]

    async def queue_depth(self) -> dict[tuple[int, str], int]:
        depth: dict[tuple[int, str], int] = {}
        for row in self.rows.values():
            key = (row.status_id, row.document_source or "")
            depth[key] = depth.get(key, 0) + 1
        return depth

    async def listen(self, on_ready: Callable[[], None]) -> bool:
        self._listeners.append(on_ready)
        return True

    async def close(self) -> None:
        self._listeners.clear()
