"""Uncertain output sizes: budget use and 429s of three reservation policies from a cold start.

A token-bound workload (index pages read through the real google-genai SDK, every prompt
unique) runs against the emulator with a strict rolling window that counts input AND
output tokens, output sizes drawn around three times the natural answer with a
coefficient of variation of 0.3, then 1.0. Three worker processes with several callers
each keep the budget saturated; the budget is 90 % of the quota, the rest is the
headroom. Every run starts cold: a fresh namespace, so no limiter state and nothing
learned. The policies:

- ``previous``: the previous release of the runtime (``git archive`` of commit
  ``PREVIOUS_COMMIT``, first on the worker processes' path): each call reserves the mean
  plus the deviation of moving averages seeded with the design note's output figures,
  and the pacing follows the reservations, refunds or not;
- ``new``: the runtime of this tree: expected tokens plus one fleet margin for the
  variances of the calls not yet settled, refunds moving the pacing back;
- ``oracle``: the current limiter told each call's exact tokens (the emulator's own
  author predicts the usage of a first occurrence), variance 0.

The worker processes of each release live for the whole section and run one policy at a
time on demand (JSON lines on their standard input and output), so a run's figures do
not include interpreter start-up. Run alone with ``python -m benchmarks.uncertainty``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

MODEL = "gemini-2.5-flash"
KIND = "index_extract"
LANE = "index"
PREVIOUS_COMMIT = "a24bb78"
POLICIES = ("previous", "new", "oracle")
LABELS = {
    "previous": f"previous release ({PREVIOUS_COMMIT})",
    "new": "new: expected tokens + fleet margin",
    "oracle": "oracle: exact tokens, variance 0",
}
SAFETY_FACTOR = 0.9  # GEMINI_SAFETY_FACTOR: the budget is this share of the quota
TARGET_BUDGET = 0.90  # of the budget, every window from the third of a cold start
TARGET_ORACLE = 0.95  # new / oracle budget use at CV 1
TARGET_429 = 0.005  # 429s / calls at CV 1
REPO = Path(__file__).resolve().parents[1]
_START_TIMEOUT_S = 120.0  # a worker process imports the runtime and the SDK
_READY_TIMEOUT_S = 60.0
_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Workload:
    """The token-bound workload every policy runs, sized by rates so windows can shrink."""

    processes: int = 3
    callers: int = 8  # concurrent callers per process
    window_s: float = 3.0  # the quota's rolling window
    windows: int = 12  # tumbling windows per run, counted from the cold start
    skip_windows: int = 2  # figures from the third window on
    tokens_per_s: int = 150_000  # the quota's token rate: about 60 calls a second
    requests_per_s: int = 200  # the quota's request rate, ten times what tokens allow
    skew_s: float = 0.05  # arrival spread the budget window is widened by, as the worker does
    latency_ms: float = 30.0
    output_scale: float = 3.0
    cvs: tuple[float, ...] = (0.3, 1.0)
    rows: tuple[int, ...] = (6, 8, 10, 12, 14, 16, 18)  # inscriptions on each sample page
    seed: int = 7

    @property
    def quota_tpm(self) -> int:
        return round(self.tokens_per_s * self.window_s)

    @property
    def quota_rpm(self) -> int:
        return round(self.requests_per_s * self.window_s)

    @property
    def budget_tpm(self) -> int:
        return math.floor(self.quota_tpm * SAFETY_FACTOR)

    @property
    def budget_rpm(self) -> int:
        return math.floor(self.quota_rpm * SAFETY_FACTOR)

    @property
    def duration_s(self) -> float:
        return self.windows * self.window_s


# --- one worker process -------------------------------------------------------------------


@dataclass
class Tally:
    """What one worker process saw in one run."""

    calls: int = 0  # generate() calls begun (each may make several attempts)
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    admissions: int = 0  # the limiter's grants: one per attempt that reached the API
    fallback_admissions: int = 0
    rate_limited_reports: int = 0
    tokens_reserved: int = 0
    tokens_settled: int = 0
    oracle_checked: int = 0
    oracle_exact: int = 0


def _oracle_client(base: type[Any], spec: dict[str, Any]) -> type[Any]:
    """A client that reserves each call's exact total tokens, variance 0."""
    from runtime.emulator import Document, EmulatorConfig, Prompt
    from runtime.pipelines.estimates import Estimate, heuristic_input

    author = EmulatorConfig(
        seed=spec["seed"], output_scale=spec["output_scale"], output_cv=spec["output_cv"]
    ).author()

    class OracleClient(base):  # type: ignore[misc, valid-type]
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.predicted: dict[str, int] = {}  # by prompt, checked against the usage

        async def estimate(self, call: Any) -> Estimate:
            # The prompt exactly as the emulator reads the request the client sends.
            prompt = Prompt(
                texts=(call.prompt,),
                system_texts=(call.system,) if call.system else (),
                inline=(Document("application/pdf", call.pdf),) if call.pdf else (),
                max_output_tokens=call.max_output_tokens,
                response_mime_type="application/json" if call.json else None,
            )
            tokens = author.answer(prompt).usage.total_tokens
            self.predicted[call.prompt] = tokens
            chars = len(call.prompt) + len(call.system or "")
            return Estimate(tokens, 0, heuristic_input(chars, call.pages, call.model))

    return OracleClient


async def _open_client(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
    """The limiter and the limited client of one policy, both closed by ``stack``."""
    import redis.asyncio as aioredis

    from runtime.limiter import Budget, create_limiter
    from runtime.pipelines.estimates import MemoryEstimates, RedisEstimates
    from runtime.pipelines.gemini import GeminiClient

    window_s = spec["window_s"] + spec["skew_s"]
    if spec["policy"] == "previous":  # its Budget knows no headroom
        budget = Budget(rpm=spec["budget_rpm"], tpm=spec["budget_tpm"], window_s=window_s)
    else:
        budget = Budget(
            rpm=spec["budget_rpm"],
            tpm=spec["budget_tpm"],
            window_s=window_s,
            tpm_headroom=spec["quota_tpm"] - spec["budget_tpm"],
        )
    limiter = await create_limiter(
        spec["redis_url"], budget, namespace=spec["namespace"], max_inflight=64
    )
    stack.push_async_callback(limiter.aclose)
    client_type: type[Any] = GeminiClient
    estimates: Any
    if spec["policy"] == "oracle":
        client_type = _oracle_client(GeminiClient, spec)
        estimates = MemoryEstimates()  # learned figures the oracle never reads
    else:
        redis = aioredis.from_url(spec["redis_url"])
        stack.push_async_callback(redis.aclose)
        estimates = RedisEstimates(redis, spec["namespace"])
    client = client_type(
        api_key="bench-key",
        limiter=limiter,
        estimates=estimates,
        base_url=spec["base_url"],
        tpm_counts="total",
    )
    stack.push_async_callback(client.aclose)
    return limiter, client


async def _caller(
    client: Any, spec: dict[str, Any], pdfs: list[bytes], number: int, stop: float, tally: Tally
) -> None:
    from runtime.pipelines.gemini import Call

    loop = asyncio.get_running_loop()
    # Seeded by process and caller: every policy asks for the same pages in the same order.
    rng = random.Random(f"{spec['seed']}:{spec['process']}:{number}")
    predicted: dict[str, int] | None = getattr(client, "predicted", None)
    n = 0
    while loop.time() < stop:
        n += 1
        text = f"{spec['prompt']}\n\nRéférence de l'appel : {spec['process']}-{number}-{n}."
        call = Call(
            kind=KIND, model=MODEL, lane=LANE, prompt=text, pdf=rng.choice(pdfs), pages=1, json=True
        )
        tally.calls += 1
        try:
            completion = await client.generate(call)
        except Exception as exc:
            tally.failed[type(exc).__name__] = tally.failed.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.05)  # a failing call never turns into a busy loop
            continue
        tally.completed += 1
        if predicted is not None:
            tally.oracle_checked += 1
            tally.oracle_exact += predicted.pop(text, -1) == completion.total_tokens


async def _run_once(
    spec: dict[str, Any], commands: asyncio.StreamReader, send: Callable[[dict[str, Any]], None]
) -> Tally:
    tally = Tally()
    pdfs = [Path(path).read_bytes() for path in spec["pdfs"]]  # noqa: ASYNC240 - small, local
    async with contextlib.AsyncExitStack() as stack:
        limiter, client = await _open_client(spec, stack)
        send({"ready": True})
        async with asyncio.timeout(_READY_TIMEOUT_S * 2):
            if not await commands.readline():
                raise RuntimeError("the benchmark ended before the run started")
        loop = asyncio.get_running_loop()
        stop = loop.time() + spec["duration_s"]
        callers = [
            asyncio.ensure_future(_caller(client, spec, pdfs, number, stop, tally))
            for number in range(spec["callers"])
        ]
        try:
            # Calls still waiting or retrying past the end are cut: the run is over.
            await asyncio.wait(callers, timeout=spec["duration_s"] + spec["grace_s"])
        finally:
            for caller in callers:
                caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        stats = limiter.stats
        tally.admissions = stats.admissions
        tally.fallback_admissions = stats.fallback_admissions
        tally.rate_limited_reports = stats.rate_limited_reports
        tally.tokens_reserved = stats.tokens_reserved
        tally.tokens_settled = stats.tokens_settled
    return tally


async def _serve(channel: IO[str]) -> int:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    send({"up": True})
    while line := await commands.readline():  # end of input: the benchmark is done
        spec = json.loads(line)["run"]
        try:
            async with asyncio.timeout(spec["duration_s"] + spec["grace_s"] + 3 * _READY_TIMEOUT_S):
                tally = await _run_once(spec, commands, send)
        except Exception as exc:
            send({"error": f"{type(exc).__name__}: {exc}"})
            return 1
        send({"result": asdict(tally)})
    return 0


def worker_main(root: str) -> int:
    """A worker process: runs the policies the benchmark sends, with the runtime in ``root``."""
    import logging

    # The protocol owns the original standard output; anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    import runtime
    import runtime.limiter
    import runtime.pipelines.gemini

    loaded = Path(runtime.__file__).resolve().parent
    if loaded != Path(root).resolve() / "runtime":
        channel.write(json.dumps({"error": f"runtime loaded from {loaded}, not {root}"}) + "\n")
        channel.flush()
        return 2
    return asyncio.run(_serve(channel))


# --- the parent: worker processes, emulator, windows ---------------------------------------


class WorkerFleet:
    """Worker processes running one release of the runtime, reused from run to run."""

    def __init__(self, root: Path, count: int, logs: Path, name: str) -> None:
        self.root, self.count, self.logs, self.name = root, count, logs, name
        self.processes: list[asyncio.subprocess.Process] = []

    def _log(self, n: int) -> Path:
        return self.logs / f"{self.name}-{n}.log"

    async def start(self) -> None:
        env = dict(os.environ)
        # The release's own ``runtime`` first (the working directory is sys.path[0]), then
        # this tree for ``benchmarks``.
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(self.root), str(REPO)]))
        for n in range(self.count):
            with self._log(n).open("wb") as errors:
                process = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "benchmarks.uncertainty", "--worker", str(self.root)),
                    cwd=self.root,
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errors,
                )
            self.processes.append(process)
        for n in range(self.count):
            await self._expect(n, "up", _START_TIMEOUT_S)

    async def _expect(self, n: int, key: str, timeout_s: float) -> Any:
        stdout = self.processes[n].stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = await stdout.readline()
        except TimeoutError:
            line = b""
        message = (
            json.loads(line) if line.strip() else {"error": f"no {key!r} within {timeout_s:g} s"}
        )
        if key not in message:
            tail = self._log(n).read_text(errors="replace")[-2_000:]
            raise RuntimeError(f"{self.name} worker {n}: {message.get('error')}\n{tail}")
        return message[key]

    async def _send(self, n: int, message: dict[str, Any]) -> None:
        stdin = self.processes[n].stdin
        assert stdin is not None
        stdin.write((json.dumps(message) + "\n").encode())
        await stdin.drain()

    async def prepare(self, specs: list[dict[str, Any]]) -> None:
        for n, spec in enumerate(specs):
            await self._send(n, {"run": spec})
        for n in range(self.count):
            await self._expect(n, "ready", _READY_TIMEOUT_S)

    async def go(self) -> None:
        for n in range(self.count):
            await self._send(n, {"go": True})

    async def results(self, timeout_s: float) -> list[dict[str, Any]]:
        return [await self._expect(n, "result", timeout_s) for n in range(self.count)]

    async def aclose(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()  # end of input: the worker leaves
        for process in self.processes:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@dataclass
class RunResult:
    policy: str
    cv: float
    tokens: list[int]  # admitted tokens per tumbling window, from the cold start
    calls: int  # arrivals from the third window on
    rejected: int
    all_calls: int
    all_rejected: int
    over_quota: int  # measured windows in which an arrival would have passed the quota
    call_tokens: float  # mean tokens of the calls the emulator admitted
    tallies: list[Tally]
    evalsha_calls: int
    evalsha_usec: int

    def total(self, name: str) -> int:
        return sum(int(getattr(tally, name)) for tally in self.tallies)


def _windows_over_quota(
    events: list[tuple[float, int, bool]], started: float, load: Workload
) -> set[int]:
    """Tumbling windows holding an arrival at which the rolling window of arrivals
    ``(t - W, t]``, admitted ones and that arrival, holds more tokens than the quota."""
    inside: deque[tuple[float, int]] = deque()
    held = 0
    over: set[int] = set()
    for at, tokens, admitted in sorted(events):
        while inside and inside[0][0] <= at - load.window_s:
            held -= inside.popleft()[1]
        if held + tokens > load.quota_tpm:
            over.add(int((at - started) // load.window_s))
        if admitted:
            inside.append((at, tokens))
            held += tokens
    return over


async def _evalsha(redis: Any) -> tuple[int, int]:
    stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def _run_policy(
    fleet: WorkerFleet, policy: str, cv: float, load: Workload, redis: Any, common: dict[str, Any]
) -> RunResult:
    from benchmarks.policies import ArrivalLog
    from runtime.emulator import Emulator, EmulatorConfig

    config = EmulatorConfig(
        rpm=load.quota_rpm,
        tpm=load.quota_tpm,
        window_s=load.window_s,
        tpm_counts="total",
        latency_ms=load.latency_ms,
        seed=load.seed,
        output_scale=load.output_scale,
        output_cv=cv,
    )
    namespace = f"bench-uncertainty-{policy}-{uuid.uuid4().hex[:8]}"  # a cold start
    async with Emulator(config) as emulator:
        log = ArrivalLog(emulator)
        specs = [
            {
                **common,
                "policy": policy,
                "namespace": namespace,
                "base_url": emulator.base_url,
                "output_cv": cv,
                "process": n,
            }
            for n in range(load.processes)
        ]
        await fleet.prepare(specs)
        calls_before, usec_before = await _evalsha(redis)
        started = time.monotonic()
        await fleet.go()
        results = await fleet.results(load.duration_s + 3 * _READY_TIMEOUT_S)
        calls_after, usec_after = await _evalsha(redis)
    w = load.window_s
    tokens = [
        sum(t for at, t, ok in log.events if ok and k * w <= at - started < (k + 1) * w)
        for k in range(load.windows)
    ]
    low, high = started + load.skip_windows * w, started + load.duration_s
    measured = [ok for at, _, ok in log.events if low <= at < high]
    over = _windows_over_quota(log.events, started, load)
    return RunResult(
        policy=policy,
        cv=cv,
        tokens=tokens,
        calls=len(measured),
        rejected=sum(1 for ok in measured if not ok),
        all_calls=len(log.events),
        all_rejected=sum(1 for _, _, ok in log.events if not ok),
        over_quota=sum(1 for k in over if load.skip_windows <= k < load.windows),
        call_tokens=statistics.mean([t for _, t, ok in log.events if ok] or [0]),
        tallies=[Tally(**result) for result in results],
        evalsha_calls=calls_after - calls_before,
        evalsha_usec=usec_after - usec_before,
    )


def _previous_release(directory: Path) -> tuple[Path | None, str]:
    """The previous release's ``runtime`` extracted into ``directory``, or why not."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_COMMIT, "runtime"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"git archive failed: {exc}"
    if archive.returncode != 0:
        reason = archive.stderr.decode(errors="replace").strip() or f"exit {archive.returncode}"
        return None, f"git archive {PREVIOUS_COMMIT} failed: {reason}"
    directory.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return directory, ""


def _sample_pages(directory: Path, load: Workload) -> list[str]:
    from runtime.emulator import make_index_pdf

    directory.mkdir()
    paths = []
    for n, rows in enumerate(load.rows):
        pdf, _ = make_index_pdf(pages=1, rows_per_page=rows, seed=load.seed + n)
        path = directory / f"page-{n}.pdf"
        path.write_bytes(pdf)
        paths.append(str(path))
    return paths


async def measure(redis_url: str, load: Workload) -> tuple[list[RunResult], str]:
    """Every policy at every CV, one run after the other; the reason ``previous`` was
    skipped, if it was."""
    import redis.asyncio as aioredis

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-uncertainty-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        previous_root, skipped = _previous_release(work / "previous")
        common = {
            "redis_url": redis_url,
            "window_s": load.window_s,
            "skew_s": load.skew_s,
            "budget_rpm": load.budget_rpm,
            "budget_tpm": load.budget_tpm,
            "quota_tpm": load.quota_tpm,
            "callers": load.callers,
            "duration_s": load.duration_s,
            "grace_s": min(1.0, load.window_s / 2),
            "seed": load.seed,
            "output_scale": load.output_scale,
            "prompt": (REPO / "runtime/pipelines/prompts/index_extract.txt").read_text().strip(),
            "pdfs": _sample_pages(work / "pages", load),
        }
        fleets = {"current": WorkerFleet(REPO, load.processes, work / "logs", "current")}
        if previous_root is not None:
            fleets["previous"] = WorkerFleet(
                previous_root, load.processes, work / "logs", "previous"
            )
        redis = aioredis.from_url(redis_url)
        try:
            starts = await asyncio.gather(
                *(fleet.start() for fleet in fleets.values()), return_exceptions=True
            )
            for name, started in zip(list(fleets), starts, strict=True):
                if isinstance(started, BaseException):
                    if name == "current":
                        raise started
                    skipped = f"its worker processes did not start: {started}"
                    await fleets.pop(name).aclose()
            for cv in load.cvs:
                for policy in POLICIES:
                    fleet = fleets.get("previous" if policy == "previous" else "current")
                    if fleet is not None:
                        results.append(await _run_policy(fleet, policy, cv, load, redis, common))
        finally:
            await asyncio.gather(*(fleet.aclose() for fleet in fleets.values()))
            await redis.aclose()
    return results, skipped


# --- the report -------------------------------------------------------------------------------


def _shares(result: RunResult, load: Workload) -> list[float]:
    return [tokens / load.budget_tpm for tokens in result.tokens]


def _first_at_target(result: RunResult, load: Workload) -> str:
    for k, share in enumerate(_shares(result, load), start=1):
        if share >= TARGET_BUDGET:
            return str(k)
    return f"never in {load.windows}"


def _median_share(result: RunResult, load: Workload) -> float:
    return statistics.median(_shares(result, load)[load.skip_windows :])


def _table(results: list[RunResult], load: Workload, skipped: str) -> list[str]:
    lines = [
        "| output CV | policy | budget used per window, median (lowest) | quota used, median | "
        "calls | 429s | 429 rate | windows over quota | first window at >= 90 % of budget |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cv in load.cvs:
        if skipped:
            lines.append(f"| {cv:g} | {LABELS['previous']} | skipped: {skipped} ||||||||")
        for result in (r for r in results if r.cv == cv):
            shares = _shares(result, load)[load.skip_windows :]
            quota = statistics.median(result.tokens[load.skip_windows :]) / load.quota_tpm
            lines.append(
                f"| {cv:g} | {LABELS[result.policy]} | {100 * statistics.median(shares):.1f} % "
                f"({100 * min(shares):.1f} %) | {100 * quota:.1f} % | {result.calls:,} | "
                f"{result.rejected:,} | {100 * result.rejected / max(1, result.calls):.2f} % | "
                f"{result.over_quota} / {len(shares)} | {_first_at_target(result, load)} |"
            )
    return lines


def _windows_table(results: list[RunResult], load: Workload) -> list[str]:
    lines = [
        "| output CV | policy | budget used, window 1, 2, ... (%) | 429s, whole run | "
        "reserved / settled tokens |",
        "|---:|---|---|---:|---:|",
    ]
    for result in results:
        shares = " ".join(f"{100 * share:.0f}" for share in _shares(result, load))
        reserved = result.total("tokens_reserved") / max(1, result.total("tokens_settled"))
        lines.append(
            f"| {result.cv:g} | {result.policy} | {shares} | {result.all_rejected:,} of "
            f"{result.all_calls:,} | {reserved:.2f} |"
        )
    return lines


def _redis_table(results: list[RunResult]) -> list[str]:
    lines = [
        "| output CV | policy | EVALSHA calls | EVALSHA time | admissions | "
        "EVALSHA per admission | Redis time per admission |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if result.policy == "oracle":
            continue
        admissions = max(1, result.total("admissions"))
        lines.append(
            f"| {result.cv:g} | {result.policy} | {result.evalsha_calls:,} | "
            f"{result.evalsha_usec / 1000:,.1f} ms | {admissions:,} | "
            f"{result.evalsha_calls / admissions:.2f} | "
            f"{result.evalsha_usec / admissions:.1f} µs |"
        )
    return lines


def _verdicts(results: list[RunResult], load: Workload) -> list[str]:
    lines = []
    by = {(r.policy, r.cv): r for r in results}
    for cv in load.cvs:
        new, oracle = by.get(("new", cv)), by.get(("oracle", cv))
        if new is None or oracle is None:
            continue
        ratio = _median_share(new, load) / max(1e-9, _median_share(oracle, load))
        lowest = min(_shares(new, load)[load.skip_windows :])
        rate = new.rejected / max(1, new.calls)
        text = (
            f"- CV {cv:g}: new / oracle budget use (medians) **{ratio:.3f}**; new's lowest "
            f"window from the third on **{100 * lowest:.1f} %** of the budget "
            f"({'meets' if lowest >= TARGET_BUDGET else 'misses'} >= "
            f"{100 * TARGET_BUDGET:.0f} %)"
        )
        if cv == max(load.cvs):
            good = ratio >= TARGET_ORACLE and rate <= TARGET_429
            text += (
                f"; 429 rate **{100 * rate:.2f} %**: {'meets' if good else 'misses'} the "
                f"target of >= {100 * TARGET_ORACLE:.0f} % of the oracle with <= "
                f"{100 * TARGET_429:.1f} % of calls answered 429"
            )
        lines.append(text + ".")
    return lines


def report(results: list[RunResult], load: Workload, skipped: str) -> str:
    ceiling = load.window_s / (load.window_s + load.skew_s)
    per_call = {cv: [r.call_tokens for r in results if r.cv == cv] for cv in load.cvs}
    sizes = " and ".join(
        f"{statistics.mean(sizes):,.0f} at CV {cv:g}" for cv, sizes in per_call.items() if sizes
    )
    failures: dict[str, int] = {}
    for result in results:
        for tally in result.tallies:
            for name, count in tally.failed.items():
                key = f"{result.policy} at CV {result.cv:g}: {name}"
                failures[key] = failures.get(key, 0) + count
    fallback = sum(r.total("fallback_admissions") for r in results)
    oracle = [r for r in results if r.policy == "oracle"]
    exact = sum(r.total("oracle_exact") for r in oracle)
    checked = sum(r.total("oracle_checked") for r in oracle)
    lines = [
        "## Uncertain output sizes: reservations from a cold start",
        "",
        f"A token-bound workload: {load.processes} worker processes x {load.callers} "
        f"concurrent callers, each call one index page ({min(load.rows)}-{max(load.rows)} "
        f"inscriptions, one of {len(load.rows)} sample pages, inline PDF) with the index "
        f"extraction prompt and a call number, so every request is a first occurrence; "
        f"through the real google-genai SDK and the runtime's `GeminiClient` (its default "
        f"retry policy: a 429 is reported to the limiter, which pauses the fleet, then "
        f"retried) to the emulator. Quota: {load.quota_tpm:,} tokens (input + output) and "
        f"{load.quota_rpm:,} requests per strict rolling {load.window_s:g} s window, so tokens "
        f"bind; model latency {load.latency_ms:g} ms; output tokens = the answer's x a "
        f"seeded lognormal factor of mean {load.output_scale:g} and CV 0.3 or 1.0 "
        f"(tokens per answered call, mean: {sizes}). Budget as `GEMINI_SAFETY_FACTOR` "
        f"{SAFETY_FACTOR:g} makes it: {load.budget_tpm:,} tokens and {load.budget_rpm:,} "
        f"requests per {load.window_s:g} s + {load.skew_s:g} s arrival skew, the "
        f"{load.quota_tpm - load.budget_tpm:,} tokens between budget and quota as the "
        f"headroom (the previous release has no headroom setting). Each policy runs "
        f"{load.windows} windows from a cold start (fresh Redis namespace: no limiter "
        f"state, nothing learned), one run each, one after the other.",
        "",
        "Budget and quota use: the tokens the emulator admitted per tumbling window, "
        f"against the budget and against the quota; the budget's window is widened by the "
        f"skew, so a fully used budget shows as {100 * ceiling:.1f} % per window. Calls, "
        f"429s and windows over quota count from window {load.skip_windows + 1} on (the "
        "429 rate is 429s / calls that arrived); a window is "
        "over quota when an arrival in it would have put the rolling window of arrivals "
        "ending there (admitted calls and that arrival) above the quota, which the strict "
        "emulator refused with a 429.",
        "",
        *_table(results, load, skipped),
        "",
        "Per window, from the cold start (budget share in %), the 429s of the whole run, "
        "and what the limiters reserved against what the calls used (`LimiterStats`, "
        "every attempt; a 429 settles at 0):",
        "",
        *_windows_table(results, load),
        "",
        f"Targets: >= {100 * TARGET_BUDGET:.0f} % of the budget in every window from the "
        f"third of a cold start; at CV 1, >= {100 * TARGET_ORACLE:.0f} % of the oracle's "
        f"budget use with <= {100 * TARGET_429:.1f} % of calls answered 429.",
        "",
        *_verdicts(results, load),
        "",
        "Redis time per admission: `INFO commandstats` read before the start and after "
        "the end of each run; the EVALSHA time and calls between the two (every limiter "
        "script run: admissions, settles, 429 reports, releases, and the estimate "
        "learning script, once per answered call) divided by the admissions the three "
        "processes' limiters granted over the run (`LimiterStats.admissions`, one per "
        "attempt that reached the emulator). The whole run is saturated.",
        "",
        *_redis_table(results),
        "",
    ]
    if checked:
        lines += [f"The oracle's reservation equalled the reported usage on {exact:,} of "
                  f"{checked:,} answered calls.", ""]  # fmt: skip
    if failures:
        failed = ", ".join(f"{name} x {count}" for name, count in sorted(failures.items()))
        lines += [f"Calls that failed for good (retry policy exhausted or cut): {failed}.", ""]
    if fallback:
        lines += [f"Admissions made without Redis (the limiter's local fallback): {fallback}.", ""]
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    """Measure every policy and return the Markdown section for docs/benchmarks.md."""
    from runtime.services import local_services

    load = Workload(window_s=1.2, windows=4) if quick else Workload()
    with local_services(os.environ.get("REDIS_URL"), "unused", with_redis=True) as urls:
        assert urls.redis_url is not None
        results, skipped = asyncio.run(measure(urls.redis_url, load))
    return report(results, load, skipped)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        raise SystemExit(worker_main(sys.argv[2]))
    print(run(quick="--quick" in sys.argv))
