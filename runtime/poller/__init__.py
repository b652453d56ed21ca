"""The queue poller: claims ``extraction_queue`` rows under leases and writes their outcome.

``Poller`` runs the claim loop of one process; a ``JobStore`` (``PostgresJobStore`` on
the extractor's database, ``MemoryJobStore`` in process) holds the queue.
"""

from __future__ import annotations

from runtime.poller.jobs import Job, JobResult, Recovery, StoreUnavailableError, backoff_s
from runtime.poller.memory import MemoryJobStore, QueueRow
from runtime.poller.poller import Handler, Poller, PollerStats
from runtime.poller.store import JobStore, PostgresJobStore

__all__ = [
    "Handler",
    "Job",
    "JobResult",
    "JobStore",
    "MemoryJobStore",
    "Poller",
    "PollerStats",
    "PostgresJobStore",
    "QueueRow",
    "Recovery",
    "StoreUnavailableError",
    "backoff_s",
]
