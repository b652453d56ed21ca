"""The limited Gemini client: every model call of the runtime passes the fleet's limiter.

A call reserves an estimate of its tokens, waits for its turn, calls the API through the
google-genai SDK (its own retries off), then settles the reservation with the usage the
API reports. A 429 pauses the whole fleet for the server's delay and is retried; 5xx and
timeouts back off exponentially; everything else fails the call for good. Each call has
a retry budget, so a sick API cannot turn into a retry storm.

Every request but deletes waits for a place among the few the client starts per
event-loop turn (``Pacer``): the SDK's CPU work per request is small, but a burst of
hundreds of them in one turn would stall the whole process.

Only ``generateContent`` is charged to the budget: Gemini's per-minute quotas count
generate requests and their tokens, not ``countTokens`` nor the File API, so charging
uploads and polls would waste a third of an acte's request budget. Those calls are still
bounded by the process's in-flight limit and have timeouts.
"""

from __future__ import annotations

import asyncio
import io
import random
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import structlog
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from runtime.errors import PermanentError, TransientError
from runtime.pipelines.estimates import Estimate, EstimateStore, heuristic_input

log = structlog.get_logger()

_DELETE_HEADROOM = 16  # connections kept for deletes, which never wait for a File API slot
_RETRY_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")
_RETRY_IN_MESSAGE = re.compile(r"retry in ([0-9.]+)\s*s", re.IGNORECASE)


class GeminiBlocked(PermanentError):
    """Gemini refused to answer (safety or policy block)."""


class GeminiRejected(PermanentError):
    """Gemini rejected the request as invalid."""


class GeminiUnavailable(TransientError):
    """Gemini kept failing or rate-limiting this call past its retry budget."""


class GrantHandle(Protocol):
    async def settle(self, actual_tokens: int) -> None: ...


class Limiter(Protocol):
    """What the client needs of the fleet limiter (``runtime.limiter``)."""

    def acquire(self, *, tokens: int, model: str, lane: str, variance: int = 0) -> Any: ...

    async def report_rate_limited(
        self, *, model: str, retry_after_s: float | None, quota_id: str | None
    ) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call may keep trying."""

    max_attempts: int = 8
    max_total_s: float = 900.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    default_429_delay_s: float = 10.0


@dataclass(frozen=True)
class Call:
    """One model call of a pipeline."""

    kind: str  # line_count, index_extract, acte_extract, boost...: what estimates learn by
    model: str
    lane: str
    prompt: str
    pdf: bytes | None = None  # one inline PDF (an index page)
    file: types.File | None = None  # an uploaded PDF (an acte)
    pages: int = 0
    system: str | None = None
    temperature: float = 0.1
    max_output_tokens: int | None = None
    json: bool = False


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None


@dataclass
class CallLog:
    """What a job's calls cost: the job's profile for logs and capacity planning."""

    calls: int = 0
    retries: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    limiter_wait_s: float = 0.0
    models: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)


current_call_log: ContextVar[CallLog | None] = ContextVar("current_call_log", default=None)


@contextmanager
def recording_calls() -> Iterator[CallLog]:
    """Every model call made inside the block (in this task and its children) is counted."""
    calls = CallLog()
    token = current_call_log.set(calls)
    try:
        yield calls
    finally:
        current_call_log.reset(token)


def _retry_info(exc: genai_errors.APIError) -> tuple[float | None, str | None]:
    """(retry delay, violated quota id) from a 429 body; either may be missing."""
    delay: float | None = None
    quota_id: str | None = None
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error", {}) if isinstance(body.get("error"), dict) else {}
    for detail in error.get("details", []) or []:
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("RetryInfo"):
            match = _RETRY_DELAY.match(str(detail.get("retryDelay", "")))
            if match:
                delay = float(match.group(1))
        elif kind.endswith("QuotaFailure"):
            for violation in detail.get("violations", []) or []:
                if isinstance(violation, dict) and violation.get("quotaId"):
                    quota_id = str(violation["quotaId"])
                    break
    if delay is None and exc.message:
        match = _RETRY_IN_MESSAGE.search(exc.message)
        if match:
            delay = float(match.group(1))
    return delay, quota_id


class Pacer:
    """Releases at most ``per_turn`` callers per event-loop turn; the others queue, in order.

    The SDK spends about a millisecond of CPU preparing each request (pydantic conversion
    and validation of its parameters) before the first byte leaves. Hundreds of calls let
    go in the same turn (a burst of jobs, a batch of uploads answered together) would do
    all that work back to back and hold the loop for the sum of it, while every timer,
    heartbeat and socket of the process waits. Spread over turns, the same work leaves the
    loop free in between; how many calls may be in flight does not change. One pacer
    serves one event loop, like the client's HTTP session.
    """

    def __init__(self, per_turn: int) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._per_turn = per_turn
        self._left = per_turn
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._refill_scheduled = False

    async def turn(self) -> None:
        """Return once this caller may start its CPU-heavy step in the current turn."""
        loop = asyncio.get_running_loop()
        if not self._refill_scheduled:
            self._refill_scheduled = True
            loop.call_soon(self._refill)
        if self._left > 0 and not self._waiters:
            self._left -= 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _refill(self) -> None:
        # Runs once per turn while anyone waits: the callers woken here run next turn.
        self._left = self._per_turn
        while self._left > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled caller gives its place up
                waiter.set_result(None)
                self._left -= 1
        self._refill_scheduled = bool(self._waiters)
        if self._refill_scheduled:
            asyncio.get_running_loop().call_soon(self._refill)


class GeminiClient:
    """google-genai's async client behind the fleet limiter."""

    def __init__(
        self,
        *,
        api_key: str,
        limiter: Limiter,
        estimates: EstimateStore,
        base_url: str | None = None,
        tpm_counts: str = "input",
        timeout_s: float = 300.0,
        max_inflight: int = 16,
        retry: RetryPolicy | None = None,
        starts_per_turn: int = 2,
    ) -> None:
        http_options = types.HttpOptions(
            api_version="v1beta",
            timeout=int(timeout_s * 1000),
            # The SDK's own retries ignore the server's retryDelay: we retry ourselves.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        if base_url:
            http_options.base_url = base_url
        # Our own session: the SDK's default one subclasses aiohttp.ClientSession, which
        # aiohttp deprecates, and owning it lets aclose() release the connections.
        # Enough connections for every admitted call AND every File API call at once:
        # aiohttp's default of 100 would silently cap the limiter's in-flight calls, and a
        # delete queued behind generate calls could time out and leave a PDF behind.
        connector = aiohttp.TCPConnector(limit=2 * max_inflight + _DELETE_HEADROOM)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )
        http_options.aiohttp_client = self._session
        self._client = genai.Client(api_key=api_key, http_options=http_options)
        self._limiter = limiter
        self._estimates = estimates
        self._tpm_counts = tpm_counts
        self._timeout_s = timeout_s
        self._files = asyncio.Semaphore(max_inflight)
        self._retry = retry or RetryPolicy()
        self._pacer = Pacer(starts_per_turn)

    async def pace(self) -> None:
        """Wait for a place among this turn's starts (see ``Pacer``) before CPU-heavy work
        of the caller's own, such as parsing a PDF."""
        await self._pacer.turn()

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        await self._session.close()

    async def estimate(self, call: Call) -> Estimate:
        """The tokens to reserve for a call (expected, with their variance)."""
        learned = await self._estimates.get(call.kind, model=call.model)
        prompt_chars = len(call.prompt) + len(call.system or "")
        raw_input = heuristic_input(prompt_chars, call.pages, call.model)
        return learned.estimate(
            raw_input,
            count_output=self._tpm_counts == "total",
            max_output=call.max_output_tokens,
        )

    def _contents(self, call: Call) -> list[types.Content]:
        parts: list[types.Part] = []
        if call.pdf is not None:
            parts.append(types.Part.from_bytes(data=call.pdf, mime_type="application/pdf"))
        if call.file is not None:
            parts.append(
                types.Part.from_uri(
                    file_uri=call.file.uri or "", mime_type=call.file.mime_type or "application/pdf"
                )
            )
        parts.append(types.Part.from_text(text=call.prompt))
        return [types.Content(role="user", parts=parts)]

    def _config(self, call: Call) -> types.GenerateContentConfig:
        return types.GenerateContentConfig(
            system_instruction=call.system,
            temperature=call.temperature,
            max_output_tokens=call.max_output_tokens,
            response_mime_type="application/json" if call.json else None,
        )

    async def generate(self, call: Call) -> Completion:
        """Call the model once, through the limiter, retrying what is worth retrying."""
        policy = self._retry
        started = time.monotonic()
        call_log = current_call_log.get()
        estimate = await self.estimate(call)
        contents, config = self._contents(call), self._config(call)
        last_problem = "no attempt made"
        for attempt in range(1, policy.max_attempts + 1):
            if attempt > 1 and call_log is not None:
                call_log.retries += 1
            async with self._limiter.acquire(
                tokens=estimate.tokens,
                model=call.model,
                lane=call.lane,
                variance=estimate.variance,
            ) as grant:
                if call_log is not None:
                    call_log.limiter_wait_s += float(getattr(grant, "wait_s", 0.0))
                    call_log.calls += 1
                    call_log.models.add(call.model)
                await self._pacer.turn()
                try:
                    async with asyncio.timeout(self._timeout_s):
                        response = await self._client.aio.models.generate_content(
                            model=call.model, contents=contents, config=config
                        )
                except genai_errors.APIError as exc:
                    delay = await self._failed(call, grant, exc, attempt)
                    last_problem = f"HTTP {exc.code} {exc.status or ''}".strip()
                except TimeoutError:
                    delay = self._backoff(attempt)  # the estimate stays charged: it may have run
                    last_problem = f"no answer within {self._timeout_s:g} s"
                except ValueError as exc:  # an answer the SDK could not parse
                    delay = self._backoff(attempt)
                    last_problem = f"unreadable answer: {exc}"
                else:
                    return await self._completed(
                        call, grant, response, estimate.heuristic_input, call_log
                    )
            elapsed = time.monotonic() - started
            if attempt == policy.max_attempts or elapsed + delay > policy.max_total_s:
                break
            log.info(
                "gemini call retried",
                kind=call.kind,
                model=call.model,
                attempt=attempt,
                problem=last_problem,
                delay_s=round(delay, 3),
            )
            if delay > 0:
                await asyncio.sleep(delay)
        raise GeminiUnavailable(
            f"Gemini {call.kind} call on {call.model} failed after "
            f"{attempt} attempts: {last_problem}"
        )

    async def _failed(
        self, call: Call, grant: GrantHandle, exc: genai_errors.APIError, attempt: int
    ) -> float:
        """Settle a failed attempt and decide how long to wait; raise if not retryable."""
        if exc.code == 429:
            delay, quota_id = _retry_info(exc)
            call_log = current_call_log.get()
            if call_log is not None:
                call_log.rate_limited += 1
            # The rejected request counted against RPM, but used no tokens.
            await grant.settle(0)
            await self._limiter.report_rate_limited(
                model=call.model, retry_after_s=delay, quota_id=quota_id
            )
            log.warning(
                "gemini rate limited", model=call.model, retry_after_s=delay, quota_id=quota_id
            )
            # The limiter's fleet-wide pause does the waiting in the next acquire.
            return 0.0
        if exc.code == 408 or exc.code >= 500:
            return self._backoff(attempt)  # the estimate stays charged: it may have run
        await grant.settle(0)
        message = exc.message or exc.status or "invalid request"
        raise GeminiRejected(f"Gemini rejected the {call.kind} call (HTTP {exc.code}): {message}")

    def _backoff(self, attempt: int) -> float:
        policy = self._retry
        ceiling = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _completed(
        self,
        call: Call,
        grant: GrantHandle,
        response: types.GenerateContentResponse,
        raw_input: int,
        call_log: CallLog | None,
    ) -> Completion:
        usage = response.usage_metadata
        input_tokens = usage.prompt_token_count if usage else None
        output_tokens = None
        total_tokens = usage.total_token_count if usage else None
        if usage is not None:
            output_tokens = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
            actual = input_tokens if self._tpm_counts == "input" else total_tokens
            if actual is not None:
                await grant.settle(actual)
            if input_tokens is not None:
                await self._estimates.observe(
                    call.kind,
                    model=call.model,
                    heuristic_in=raw_input,
                    actual_in=input_tokens,
                    actual_out=output_tokens,
                )
            if call_log is not None:
                call_log.input_tokens += input_tokens or 0
                call_log.output_tokens += output_tokens
        # else: no usage reported, the estimate stays charged (the conservative outcome)
        candidate = response.candidates[0] if response.candidates else None
        finish = candidate.finish_reason.name if candidate and candidate.finish_reason else None
        block = response.prompt_feedback.block_reason if response.prompt_feedback else None
        text = response.text if candidate and candidate.content else None
        if block is not None or finish in ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"):
            reason = block.name if block is not None else finish
            raise GeminiBlocked(f"Gemini blocked the {call.kind} answer ({reason})")
        if not text:
            raise GeminiBlocked(
                f"Gemini returned no text for the {call.kind} call (finish reason {finish})"
            )
        return Completion(
            text=text,
            finish_reason=finish,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
        )

    async def upload_pdf(self, data: bytes, *, display_name: str) -> types.File:
        """Upload a PDF to the File API; returns once the upload is done (maybe PROCESSING)."""
        async with self._files:
            await self._pacer.turn()
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await self._client.aio.files.upload(
                        file=io.BytesIO(data),
                        config=types.UploadFileConfig(
                            mime_type="application/pdf", display_name=display_name
                        ),
                    )
            except TimeoutError as exc:
                raise TransientError("the File API upload timed out") from exc
            except genai_errors.APIError as exc:
                raise self._file_error("upload", exc) from exc

    async def wait_active(
        self, file: types.File, *, timeout_s: float = 300.0, first_poll_s: float = 0.5
    ) -> types.File:
        """Poll an uploaded file until it is ACTIVE; FAILED or too slow is an error."""
        deadline = time.monotonic() + timeout_s
        interval = first_poll_s
        while True:
            state = file.state.name if file.state else "STATE_UNSPECIFIED"
            if state == "ACTIVE":
                return file
            if state == "FAILED":
                raise PermanentError(f"Gemini could not process the uploaded PDF ({file.name})")
            if time.monotonic() + interval > deadline:
                raise TransientError(
                    f"uploaded PDF {file.name} still {state} after {timeout_s:g} s"
                )
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 5.0)
            async with self._files:
                await self._pacer.turn()
                try:
                    async with asyncio.timeout(self._timeout_s):
                        file = await self._client.aio.files.get(name=file.name or "")
                except TimeoutError as exc:
                    raise TransientError("the File API did not answer") from exc
                except genai_errors.APIError as exc:
                    raise self._file_error("get", exc) from exc

    async def delete_file(self, file: types.File) -> None:
        """Delete an uploaded file; failures are logged, never raised (it expires anyway).

        Deletes skip the File API slots: cleanup must not queue behind new uploads.
        """
        try:
            async with asyncio.timeout(min(self._timeout_s, 60.0)):
                await self._client.aio.files.delete(name=file.name or "")
        except (TimeoutError, genai_errors.APIError) as exc:
            log.warning("uploaded file not deleted", file=file.name, error=str(exc))

    async def count_tokens(self, *, model: str, parts: Sequence[types.Part]) -> int:
        async with self._files:
            await self._pacer.turn()
            async with asyncio.timeout(self._timeout_s):
                result = await self._client.aio.models.count_tokens(
                    model=model, contents=[types.Content(role="user", parts=list(parts))]
                )
        return result.total_tokens or 0

    @staticmethod
    def _file_error(action: str, exc: genai_errors.APIError) -> Exception:
        if exc.code == 429 or exc.code >= 500:
            return TransientError(f"File API {action} failed (HTTP {exc.code})")
        return PermanentError(f"File API {action} rejected (HTTP {exc.code}): {exc.message}")
