"""``python -m runtime demo``: a whole fleet on one machine, in about a minute.

Embedded Postgres and Redis (or the configured ones), the Gemini emulator with a small
quota and a short window, sample index and acte PDFs enqueued as the extractor would,
and several real worker processes sharing one budget. Progress is shown live; a summary
says what the emulator saw: jobs, calls, tokens, the peak share of the quota in any
window, and 429s. Everything it started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from runtime.db import init_schema
from runtime.emulator import Emulator, EmulatorConfig, make_acte_pdf, make_index_pdf
from runtime.services import local_services
from runtime.settings import Settings

DEMO_API_KEY = "demo-key-not-secret"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--index", type=int, default=12, help="index documents to enqueue")
    parser.add_argument("--actes", type=int, default=12, help="actes to enqueue")
    parser.add_argument("--rpm", type=int, default=40, help="emulator requests per window")
    parser.add_argument("--tpm", type=int, default=60_000, help="emulator tokens per window")
    parser.add_argument("--window-s", type=float, default=10.0, help="quota window, seconds")
    parser.add_argument("--latency-ms", type=int, default=150, help="emulator latency per call")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up after this long")


@dataclass
class Progress:
    done: dict[str, int]
    failed: dict[str, int]
    waiting: int

    @property
    def finished(self) -> int:
        return sum(self.done.values()) + sum(self.failed.values())


async def enqueue(dsn: str, rows: list[tuple[str, str, str]]) -> None:
    """Insert rows ready for OCR (source, number, storage path), as the extractor does."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.executemany(
            "INSERT INTO extraction_queue (document_source, document_number, supabase_path,"
            " circonscription_fonciere, status_id) VALUES ($1, $2, $3, 'Montréal', 3)",
            rows,
        )
    finally:
        await connection.close()


async def _enqueue(dsn: str, documents: Path, args: argparse.Namespace) -> int:
    rows: list[tuple[str, str, str]] = []
    for number in range(args.index):
        pages = 2 + number % 3
        pdf, _ = make_index_pdf(pages=pages, rows_per_page=[6, 9, 4, 11][:pages], seed=number)
        name = f"{100 + number}-Montreal-{number:04d}.pdf"
        (documents / "index" / name).write_bytes(pdf)
        rows.append(("index", f"{100 + number}", name))
    for number in range(args.actes):
        pdf, _ = make_acte_pdf(pages=2 + number % 2, seed=1000 + number)
        name = f"{25_000_000 + number}-Quebec-{number:04d}.pdf"
        (documents / "actes" / name).write_bytes(pdf)
        rows.append(("acte", f"{25_000_000 + number}", name))
    await enqueue(dsn, rows)
    return len(rows)


async def _progress(dsn: str) -> Progress:
    connection = await asyncpg.connect(dsn)
    try:
        counts = await connection.fetch(
            "SELECT document_source, status_id, count(*) AS n FROM extraction_queue"
            " GROUP BY document_source, status_id"
        )
    finally:
        await connection.close()
    done: dict[str, int] = {}
    failed: dict[str, int] = {}
    waiting = 0
    for row in counts:
        if row["status_id"] == 5:
            done[row["document_source"]] = row["n"]
        elif row["status_id"] == 4:
            failed[row["document_source"]] = row["n"]
        else:
            waiting += row["n"]
    return Progress(done, failed, waiting)


def _worker_env(settings: Settings, args: argparse.Namespace, urls: Any, emulator: Emulator,
                documents: Path, number: int) -> dict[str, str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "WORKER_"))}
    env.update(
        DATABASE_URL=urls.database_url,
        REDIS_URL=urls.redis_url,
        GEMINI_API_KEY=DEMO_API_KEY,
        GEMINI_BASE_URL=emulator.base_url,
        GEMINI_RPM_LIMIT=str(args.rpm),
        GEMINI_TPM_LIMIT=str(args.tpm),
        GEMINI_WINDOW_S=str(args.window_s),
        GEMINI_SAFETY_FACTOR=str(settings.gemini_safety_factor),
        GEMINI_ARRIVAL_SKEW_S="0.2",
        GEMINI_TPM_COUNTS="input",
        DOCUMENTS_URL=documents.as_uri(),
        WORKER_ID=f"demo-worker-{number}",
        WORKER_CONCURRENCY="4",
        POLL_INTERVAL_S="0.5",
        JOB_LEASE_S="15",
        WORKER_DRAIN_S="10",
        REDIS_NAMESPACE="demo",
        LOG_FORMAT="json",
        LOG_LEVEL="info",
    )
    return env


def _view(progress: Progress, total: int, stats: dict[str, Any], started: float) -> Table:
    table = Table(title=f"Demo fleet: {progress.finished}/{total} documents, "
                        f"{time.monotonic() - started:.0f} s")  # fmt: skip
    for column in ("", "index", "acte"):
        table.add_column(column, justify="right")
    table.add_row("done", str(progress.done.get("index", 0)), str(progress.done.get("acte", 0)))
    table.add_row("failed", str(progress.failed.get("index", 0)),
                  str(progress.failed.get("acte", 0)))  # fmt: skip
    for model, figures in stats["models"].items():
        limits = figures["limits"]
        table.add_row(
            model,
            f"RPM {100 * figures['window_requests'] / limits['rpm']:.0f}% of quota "
            f"(peak {100 * figures['peak_counted_requests'] / limits['rpm']:.0f}%)",
            f"TPM {100 * figures['window_tokens'] / limits['tpm']:.0f}% of quota "
            f"(peak {100 * figures['peak_tokens'] / limits['tpm']:.0f}%)  "
            f"429s {figures['http_429']}",
        )
    return table


def _summary(progress: Progress, stats: dict[str, Any], elapsed: float) -> Table:
    table = Table(title="Demo summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("jobs done", str(sum(progress.done.values())))
    table.add_row("jobs failed", str(sum(progress.failed.values())))
    for model, figures in stats["models"].items():
        limits = figures["limits"]
        table.add_row(f"{model}: calls", str(figures["requests"]))
        table.add_row(f"{model}: tokens (in/out)",
                      f"{figures['input_tokens']}/{figures['output_tokens']}")  # fmt: skip
        table.add_row(f"{model}: peak % of RPM quota in any window",
                      f"{100 * figures['peak_counted_requests'] / limits['rpm']:.0f}%")  # fmt: skip
        table.add_row(f"{model}: peak % of TPM quota in any window",
                      f"{100 * figures['peak_tokens'] / limits['tpm']:.0f}%")  # fmt: skip
        table.add_row(f"{model}: 429s seen by the emulator", str(figures["http_429"]))
    table.add_row("files left at the emulator", str(stats["files"]["stored"]))
    table.add_row("time", f"{elapsed:.1f} s")
    table.add_row("throughput", f"{progress.finished / max(elapsed, 1e-9) * 60:.1f} documents/min")
    return table


async def _stop(workers: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM (the workers drain and hand back), then SIGKILL what is left after 30 s."""
    for process in workers:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(p.wait() for p in workers))
    except TimeoutError:
        for process in workers:
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*(p.wait() for p in workers))


async def _demo(args: argparse.Namespace, settings: Settings, urls: Any, workdir: Path) -> int:
    console = Console()
    documents = workdir / "documents"
    for bucket in ("index", "actes"):
        (documents / bucket).mkdir(parents=True)
    await init_schema(urls.database_url)
    total = await _enqueue(urls.database_url, documents, args)
    config = EmulatorConfig(rpm=args.rpm, tpm=args.tpm, window_s=args.window_s,
                            latency_ms=args.latency_ms, processing_polls=1)  # fmt: skip
    workers: list[asyncio.subprocess.Process] = []
    async with Emulator(config) as emulator:
        console.print(f"{total} documents enqueued; emulator at {emulator.base_url} with "
                      f"{args.rpm} requests and {args.tpm} tokens per {args.window_s:g} s; "
                      f"worker logs in {workdir / 'workers.log'}")  # fmt: skip
        started = time.monotonic()
        with (workdir / "workers.log").open("ab") as log:
            try:
                for number in range(args.workers):
                    workers.append(await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "runtime", "worker",
                        env=_worker_env(settings, args, urls, emulator, documents, number),
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    ))  # fmt: skip
                progress = await _progress(urls.database_url)
                with Live(_view(progress, total, emulator.stats(), started), console=console,
                          refresh_per_second=2) as live:  # fmt: skip
                    while progress.finished < total:
                        if time.monotonic() - started > args.timeout_s:
                            console.print(f"timed out after {args.timeout_s:g} s")
                            break
                        if all(p.returncode is not None for p in workers):
                            console.print("every worker exited; see workers.log")
                            break
                        await asyncio.sleep(0.5)
                        progress = await _progress(urls.database_url)
                        live.update(_view(progress, total, emulator.stats(), started))
            finally:
                await _stop(workers)
        elapsed = time.monotonic() - started
        stats = emulator.stats()
    console.print(_summary(progress, stats, elapsed))
    return 0 if progress.finished == total and not progress.failed else 1


def run(args: argparse.Namespace, settings: Settings) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="registre-ocr-demo-") as name,
        local_services(settings.redis_url, settings.database_url) as urls,
    ):
        return asyncio.run(_demo(args, settings, urls, Path(name)))
