"""A whole fleet for end-to-end tests: the emulator, sample documents, queued rows, and
real worker processes sharing one Redis limiter.

``async with Fleet(...) as fleet`` starts the emulator in this process (with a strict
rolling quota equal to the fleet's limits), writes the documents under a ``file://`` tree,
enqueues one ready row per document and starts the workers. Every worker it started is
stopped on exit (SIGTERM, then SIGKILL), whatever happened in the test.

Every pipeline uses one model, so the emulator's per-model quota and the limiter's single
shared budget measure the same traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import asyncpg

from runtime.emulator import (
    Emulator,
    EmulatorConfig,
    make_acte_pdf,
    make_corrupt_pdf,
    make_empty_pdf,
    make_encrypted_pdf,
    make_index_pdf,
)
from runtime.limiter import Budget, Limiter, create_limiter
from runtime.ops.demo import enqueue
from runtime.services import free_port

API_KEY = "e2e-key-not-secret"
FINAL = (4, 5)
_BUCKETS = {"index": "index", "acte": "actes"}
# Variables the fleet sets itself: none is inherited from the environment of the tests.
_OWN_PREFIXES = ("GEMINI_", "WORKER_", "REDIS_", "DATABASE_", "MONITOR_", "METRICS_", "JOB_",
                 "POLL_", "DOCUMENTS_", "LOG_")  # fmt: skip


@dataclass(frozen=True)
class Document:
    """One queued row: its type, the file's name, and the bytes (None: no file at all)."""

    source: str
    number: str
    name: str
    pdf: bytes | None


def sample_documents(index: int, actes: int, *, seed: int = 0) -> list[Document]:
    """Small, readable documents (1 to 3 pages) the emulator answers believably."""
    documents = []
    for n in range(index):
        pages = 1 + (n + seed) % 3
        pdf, _ = make_index_pdf(pages=pages, rows_per_page=[5, 8, 3][:pages], seed=seed + n)
        number = str(1000 + seed + n)
        documents.append(Document("index", number, f"{number}-Montreal.pdf", pdf))
    for n in range(actes):
        pdf, _ = make_acte_pdf(pages=1 + (n + seed) % 2, seed=5000 + seed + n)
        number = str(26_000_000 + seed + n)
        documents.append(Document("acte", number, f"{number}-Quebec.pdf", pdf))
    return documents


def poison_documents() -> list[Document]:
    """Documents no pipeline can read: corrupt, encrypted, empty, and a missing file."""
    return [
        Document("index", "9000001", "9000001-corrupt.pdf", make_corrupt_pdf()),
        Document("acte", "99000002", "99000002-encrypted.pdf", make_encrypted_pdf()),
        Document("index", "9000003", "9000003-empty.pdf", make_empty_pdf()),
        Document("acte", "99000004", "99000004-missing.pdf", None),
    ]


@dataclass
class FleetConfig:
    """The quota, the fleet and its workers' settings."""

    workers: int = 3
    rpm: int = 60
    tpm: int = 1_000_000
    window_s: float = 5.0
    safety_factor: float = 0.9
    arrival_skew_s: float = 0.2
    latency_ms: float = 60.0
    model: str = "gemini-2.5-flash"
    concurrency: int = 4
    lease_s: float = 15.0
    drain_s: float = 10.0
    poll_interval_s: float = 0.5
    namespace: str = "e2e"
    env: dict[str, str] = field(default_factory=dict)
    # More emulator settings (tpm_counts, output_scale, output_cv, seed...).
    emulator: dict[str, Any] = field(default_factory=dict)
    """Extra variables for every worker."""

    @property
    def rpm_budget(self) -> int:
        return max(1, math.floor(self.rpm * self.safety_factor))

    @property
    def tpm_budget(self) -> int:
        return max(1, math.floor(self.tpm * self.safety_factor))

    @property
    def limiter_window_s(self) -> float:
        return self.window_s + self.arrival_skew_s


@dataclass
class Worker:
    """One worker process and where its log goes."""

    number: int
    worker_id: str
    process: asyncio.subprocess.Process
    log_path: Path
    metrics_port: int | None
    started_at: float

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines are skipped)."""
        found = []
        with self.log_path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        found.append(event)
        return found


class FleetError(AssertionError):
    """The fleet did not get where a test waited for it to get."""


class Fleet:
    """See the module docstring."""

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        workdir: Path,
        documents: Sequence[Document],
        config: FleetConfig | None = None,
        *,
        start_workers: bool = True,
    ) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.workdir = workdir
        self.documents = list(documents)
        self.config = config or FleetConfig()
        self.workers: list[Worker] = []
        self.emulator = Emulator(
            EmulatorConfig(
                rpm=self.config.rpm,
                tpm=self.config.tpm,
                window_s=self.config.window_s,
                latency_ms=self.config.latency_ms,
                processing_polls=1,
                **self.config.emulator,
            )
        )
        self._start_workers = start_workers
        self.started_at = 0.0

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        await self.emulator.start()
        try:
            self._write_documents()
            await self._enqueue()
            self.started_at = time.monotonic()
            if self._start_workers:
                for number in range(self.config.workers):
                    await self.start_worker(number)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every worker (SIGTERM, SIGKILL after a grace), then the emulator."""
        try:
            await self.stop_workers(self.workers)
        finally:
            await self.emulator.stop()

    async def stop_workers(self, workers: Iterable[Worker], grace_s: float = 20.0) -> None:
        chosen = list(workers)
        for worker in chosen:
            if worker.alive:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.gather(*(w.process.wait() for w in chosen))
        except TimeoutError:
            pass
        finally:
            for worker in chosen:
                if worker.alive:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.gather(*(w.process.wait() for w in chosen))

    # -- documents and rows ----------------------------------------------------------------

    @property
    def documents_dir(self) -> Path:
        return self.workdir / "documents"

    def _write_documents(self) -> None:
        for bucket in _BUCKETS.values():
            (self.documents_dir / bucket).mkdir(parents=True, exist_ok=True)
        for document in self.documents:
            if document.pdf is not None:
                path = self.documents_dir / _BUCKETS[document.source] / document.name
                path.write_bytes(document.pdf)

    async def _enqueue(self) -> None:
        await enqueue(self.database_url, [(d.source, d.number, d.name) for d in self.documents])

    async def rows(self) -> list[asyncpg.Record]:
        """Every row of the queue with the columns the tests look at."""
        connection = await asyncpg.connect(self.database_url, timeout=5)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(
                "SELECT id, document_source, document_number, supabase_path, status_id,"
                " ocr_attempts, ocr_error, ocr_worker_id, file_content"
                " FROM extraction_queue ORDER BY document_number"
            )
            return rows
        finally:
            await connection.close()

    async def statuses(self) -> Counter[int]:
        return Counter(row["status_id"] for row in await self.rows())

    async def wait_until(
        self, predicate: Any, *, timeout_s: float, what: str, every_s: float = 0.25
    ) -> None:
        """Poll ``predicate(rows)`` until true; database outages are waited out."""
        deadline = time.monotonic() + timeout_s
        last: Counter[int] = Counter()
        while True:
            try:
                rows = await self.rows()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                rows = None
            if rows is not None:
                last = Counter(row["status_id"] for row in rows)
                if predicate(rows):
                    return
            if time.monotonic() > deadline:
                raise FleetError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                 f"statuses {dict(last)}; {self.describe_workers()}")  # fmt: skip
            if self.workers and not any(w.alive for w in self.workers):
                raise FleetError(f"every worker exited while waiting for {what}; "
                                 f"statuses {dict(last)}; {self.describe_workers()}")  # fmt: skip
            await asyncio.sleep(every_s)

    async def wait_all_final(self, timeout_s: float = 90.0) -> list[asyncpg.Record]:
        """Wait until every row is 4 or 5; the rows then."""
        await self.wait_until(
            lambda rows: all(r["status_id"] in FINAL for r in rows),
            timeout_s=timeout_s,
            what="every row to be final",
        )
        return await self.rows()

    async def wait_done(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until at least ``count`` rows are in 5."""
        await self.wait_until(
            lambda rows: sum(r["status_id"] == 5 for r in rows) >= count,
            timeout_s=timeout_s,
            what=f"{count} rows done",
        )

    # -- workers -----------------------------------------------------------------------------

    def worker_env(self, number: int, **overrides: str) -> dict[str, str]:
        config = self.config
        env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            REDIS_NAMESPACE=config.namespace,
            GEMINI_API_KEY=API_KEY,
            GEMINI_BASE_URL=self.emulator.base_url,
            GEMINI_RPM_LIMIT=str(config.rpm),
            GEMINI_TPM_LIMIT=str(config.tpm),
            GEMINI_WINDOW_S=str(config.window_s),
            GEMINI_SAFETY_FACTOR=str(config.safety_factor),
            GEMINI_ARRIVAL_SKEW_S=str(config.arrival_skew_s),
            GEMINI_TPM_COUNTS=str(config.emulator.get("tpm_counts", "input")),
            GEMINI_MODEL_INDEX=config.model,
            GEMINI_MODEL_ACTE=config.model,
            GEMINI_MODEL_BOOST=config.model,
            DOCUMENTS_URL=self.documents_dir.as_uri(),
            WORKER_ID=f"e2e-worker-{number}",
            WORKER_CONCURRENCY=str(config.concurrency),
            WORKER_DRAIN_S=str(config.drain_s),
            JOB_LEASE_S=str(config.lease_s),
            POLL_INTERVAL_S=str(config.poll_interval_s),
            LOG_FORMAT="json",
            LOG_LEVEL="info",
            PYTHONUNBUFFERED="1",
        )
        env.update(config.env)
        env.update(overrides)
        return env

    async def start_worker(self, number: int, *, metrics: bool = False, **env: str) -> Worker:
        port = free_port() if metrics else None
        if port is not None:
            env["METRICS_PORT"] = str(port)
        environment = self.worker_env(number, **env)
        log_path = self.workdir / f"worker-{number}.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "runtime", "worker",
                env=environment, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        worker = Worker(number, environment["WORKER_ID"], process, log_path, port,
                        time.monotonic())  # fmt: skip
        self.workers.append(worker)
        return worker

    async def wait_started(self, timeout_s: float = 30.0) -> float:
        """Wait until every worker logged ``worker started``; the monotonic time then."""
        deadline = time.monotonic() + timeout_s
        while not all(any(e.get("event") == "worker started" for e in w.events())
                      for w in self.workers):  # fmt: skip
            if time.monotonic() > deadline:
                raise FleetError(f"workers did not start; {self.describe_workers()}")
            if not all(w.alive for w in self.workers):
                raise FleetError(f"a worker exited at start; {self.describe_workers()}")
            await asyncio.sleep(0.1)
        return time.monotonic()

    async def kill(self, worker: Worker) -> int:
        """SIGKILL: the process dies at once, holding whatever it held."""
        worker.process.kill()
        return await worker.process.wait()

    async def terminate(self, worker: Worker, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM and wait up to ``timeout_s``: (exit status or None, seconds it took)."""
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                code = await worker.process.wait()
        except TimeoutError:
            return None, time.monotonic() - started
        return code, time.monotonic() - started

    def describe_workers(self) -> str:
        parts = []
        for worker in self.workers:
            state = "alive" if worker.alive else f"exit {worker.process.returncode}"
            tail = ""
            if not worker.alive and worker.process.returncode not in (0, -9):
                with contextlib.suppress(OSError):
                    tail = " last log: " + worker.log_path.read_text()[-800:]
            parts.append(f"{worker.worker_id} {state}{tail}")
        return "workers: " + "; ".join(parts)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log lines of every worker, each with its ``worker`` number; optionally one event."""
        found = []
        for worker in self.workers:
            for event in worker.events():
                if name is None or event.get("event") == name:
                    found.append({**event, "worker": worker.number})
        return found

    def completions(self) -> Counter[str]:
        """Completed writes per job id, from the poller's ``job done`` lines."""
        return Counter(str(e.get("job_id")) for e in self.events("job done") if "pages" not in e)

    async def scrape(self, worker: Worker) -> dict[str, float]:
        """The worker's Prometheus text as {sample with labels: value}."""
        assert worker.metrics_port is not None, "the worker was started without metrics"
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            response.raise_for_status()
            text = await response.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    # -- limiter, monitor, emulator -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def observer(self) -> AsyncIterator[Limiter]:
        """A limiter on the fleet's Redis state that only looks (registry, usage)."""
        budget = Budget(rpm=self.config.rpm_budget, tpm=self.config.tpm_budget,
                        window_s=self.config.limiter_window_s)  # fmt: skip
        limiter = await create_limiter(self.redis_url, budget, namespace=self.config.namespace)
        try:
            yield limiter
        finally:
            await limiter.aclose()

    async def monitor(self, **env: str) -> tuple[int, dict[str, Any] | None, str]:
        """``monitor --once --json`` with the workers' settings: (exit, JSON or None, stderr)."""
        environment = self.worker_env(99, **env)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runtime", "monitor", "--once", "--json",
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                out, err = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        data = None
        with contextlib.suppress(ValueError):
            data = json.loads(out)
        assert process.returncode is not None
        return process.returncode, data, err.decode(errors="replace")

    def stats(self) -> dict[str, Any]:
        """The emulator's counters for the fleet's model (zeros before the first call)."""
        models: dict[str, dict[str, Any]] = self.emulator.stats()["models"]
        return models.get(self.config.model, {"requests": 0, "admitted": 0, "rejected": 0,
                                              "http_429": 0, "peak_counted_requests": 0,
                                              "peak_tokens": 0})  # fmt: skip

    def files_stored(self) -> int:
        return int(self.emulator.stats()["files"]["stored"])

    def window_usage(self) -> tuple[int, int]:
        """Requests and tokens the emulator counts in its rolling window right now."""
        quota = self.emulator.service.quotas.get(self.config.model)
        if quota is None:
            return 0, 0
        return quota.usage(time.monotonic())

    def utilisation(self) -> float:
        """Busiest window's share of the fleet's budget, the binding dimension."""
        stats = self.stats()
        return max(
            float(stats["peak_counted_requests"]) / self.config.rpm_budget,
            float(stats["peak_tokens"]) / self.config.tpm_budget,
        )
