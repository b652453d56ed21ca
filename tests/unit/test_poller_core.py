"""The poller's pure parts, and the claim loop on the in-memory store (no sleeping)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

import runtime.poller
from runtime.errors import ConfigurationError, PermanentError, TransientError
from runtime.poller import Job, JobResult, MemoryJobStore, Poller, backoff_s
from runtime.poller.jobs import error_text
from runtime.poller.store import QUERIES

RESULT = JobResult(file_content="raw", boosted_file_content="boosted")


def test_all_names_what_the_package_exports() -> None:
    exported = {name for name in dir(runtime.poller) if not name.startswith("_")}
    modules = {"jobs", "memory", "poller", "store"}
    assert set(runtime.poller.__all__) == exported - modules - {"annotations"}


def test_every_named_query_is_loaded() -> None:
    assert set(QUERIES) >= {
        "claim_batch", "release_claim", "complete", "fail", "hand_back", "claim_outcome",
        "heartbeat", "drop_lease", "try_sweep_lock", "recover", "forget_dead_leases",
        "queue_depth",
    }  # fmt: skip
    assert all(query and not query.startswith("-- name") for query in QUERIES.values())


@given(
    attempts=st.integers(min_value=1, max_value=40),
    base=st.floats(min_value=0.01, max_value=60),
    cap=st.floats(min_value=0.01, max_value=3600),
    seed=st.integers(),
)
def test_backoff_is_exponential_capped_and_jittered(
    attempts: int, base: float, cap: float, seed: int
) -> None:
    step = min(cap, base * 2 ** (attempts - 1))
    delay = backoff_s(attempts, base_s=base, max_s=cap, rng=random.Random(seed))
    assert step / 2 <= delay <= step


@given(retry_after=st.floats(min_value=0, max_value=1000))
def test_a_server_given_delay_is_a_floor(retry_after: float) -> None:
    assert backoff_s(1, base_s=1, max_s=10, at_least_s=retry_after) >= retry_after


def test_error_text_names_foreign_exceptions_and_is_bounded() -> None:
    assert error_text(PermanentError("not a PDF")) == "not a PDF"
    assert error_text(KeyError("page")) == "KeyError: 'page'"
    assert len(error_text(ValueError("x" * 10_000))) == 2000


async def _done(job: Job) -> JobResult:
    return RESULT


def _poller(store: MemoryJobStore, handler: object = _done, **options: object) -> Poller:
    settings: dict[str, object] = {
        "worker_id": "w1",
        "worker_types": ["index", "acte"],
        "concurrency": 1,
        "lease_s": 60.0,
        "poll_interval_s": 60.0,
        "drain_s": 1.0,
    }
    return Poller(store, handler, **{**settings, **options})  # type: ignore[arg-type]


def test_configuration_without_an_ocr_type_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        _poller(MemoryJobStore(), worker_types=["plan_cadastraux"])
    with pytest.raises(ConfigurationError):
        _poller(MemoryJobStore(), concurrency=0)


async def test_types_take_turns_even_when_one_is_older() -> None:
    store = MemoryJobStore(clock=lambda: 0.0)
    store.add_many("index", 4, created_at=-100.0)  # much older
    store.add_many("acte", 4)
    seen: list[str] = []
    finished = asyncio.Event()

    async def record(job: Job) -> JobResult:
        seen.append(job.document_source)
        if len(seen) == 8:
            finished.set()
        return RESULT

    poller = _poller(store, record)
    task = asyncio.create_task(poller.run())
    await finished.wait()  # no timer involved: each full claim is followed at once
    poller.stop()
    await task
    assert seen == ["index", "acte"] * 4
    assert poller.stats.done == 8
    assert poller.stats.in_flight == 0


async def test_outcomes_are_counted() -> None:
    store = MemoryJobStore(clock=lambda: 0.0)
    bad = store.add("acte", document_number="bad")
    retry = store.add("acte", document_number="retry")
    good = store.add("acte", document_number="good")
    handled = asyncio.Event()
    seen: list[str] = []

    async def handler(job: Job) -> JobResult:
        seen.append(job.document_number or "")
        if len(seen) == 3:
            handled.set()
        if job.document_number == "bad":
            raise PermanentError("unreadable")
        if job.document_number == "retry":
            raise TransientError("quota", retry_after_s=42.0)
        return RESULT

    poller = _poller(store, handler, concurrency=3)
    task = asyncio.create_task(poller.run())
    await handled.wait()
    poller.stop()
    await task
    assert (store.rows[bad].status_id, store.rows[bad].ocr_error) == (4, "unreadable")
    assert store.rows[retry].status_id == 3
    assert store.rows[retry].ocr_not_before is not None
    assert store.rows[retry].ocr_not_before >= 42.0
    assert store.rows[good].status_id == 5
    stats = poller.stats
    assert (stats.claimed, stats.done, stats.failed, stats.retried) == (3, 1, 1, 1)


class _StuckClaims(MemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.claiming = asyncio.Event()

    async def claim_batch(
        self, worker_id: str, worker_types: Sequence[str], limit: int
    ) -> list[Job]:
        self.claiming.set()
        await asyncio.Event().wait()  # a claim that never answers
        raise AssertionError("unreachable")


async def test_cancelling_a_claim_in_progress_leaks_nothing() -> None:
    store = _StuckClaims()
    poller = _poller(store)
    task = asyncio.create_task(poller.run())
    await store.claiming.wait()
    assert "w1" in store.leases
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.leases == {}, "the lease must be dropped"
    assert poller.stats.in_flight == 0


async def test_stop_before_run_returns_at_once() -> None:
    store = MemoryJobStore()
    store.add("index")
    poller = _poller(store)
    poller.stop()
    await poller.run()
    assert poller.stats.claimed == 0
