"""The limited Gemini client: the real SDK, over HTTP, to the emulator, through the limiter."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from runtime.emulator import Emulator, EmulatorConfig, FaultRule, make_acte_pdf, make_index_pdf
from runtime.errors import PermanentError
from runtime.limiter import Budget, Limiter, create_limiter
from runtime.pipelines.common import open_pdf
from runtime.pipelines.estimates import MemoryEstimates, RedisEstimates, seed_output
from runtime.pipelines.gemini import (
    Call,
    GeminiBlocked,
    GeminiClient,
    GeminiRejected,
    GeminiUnavailable,
    RetryPolicy,
    recording_calls,
)
from runtime.pipelines.index import split_pages

MODEL = "gemini-2.5-flash"
ARRIVAL_SKEW_S = 0.1
# Far above anything the tests send; a short window keeps pauses after 429s short.
BIG = Budget(rpm=100_000, tpm=100_000_000, window_s=2.0)
FAST_RETRY = RetryPolicy(max_attempts=6, backoff_base_s=0.05, backoff_max_s=0.2)


@asynccontextmanager
async def client_for(
    emulator: Emulator,
    limiter: Limiter,
    *,
    retry: RetryPolicy = FAST_RETRY,
    timeout_s: float = 30.0,
    estimates: MemoryEstimates | RedisEstimates | None = None,
) -> AsyncIterator[GeminiClient]:
    client = GeminiClient(
        api_key="test-key",
        base_url=emulator.base_url,
        limiter=limiter,
        estimates=estimates or MemoryEstimates(),
        retry=retry,
        timeout_s=timeout_s,
    )
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def limited(budget: Budget, redis_url: str | None = None) -> AsyncIterator[Limiter]:
    limiter = await create_limiter(redis_url, budget, max_inflight=64)
    try:
        yield limiter
    finally:
        await limiter.aclose()


@asynccontextmanager
async def wired(
    config: EmulatorConfig,
    budget: Budget | None = None,
    redis_url: str | None = None,
    **client_options: Any,
) -> AsyncIterator[tuple[Emulator, Limiter, GeminiClient]]:
    """An emulator, a limiter and a client pointed at both."""
    async with (
        Emulator(config) as emulator,
        limited(budget or BIG, redis_url) as limiter,
        client_for(emulator, limiter, **client_options) as client,
    ):
        yield emulator, limiter, client


def page_call(pdf: bytes, kind: str = "line_count") -> Call:
    text = (
        "Comptez le nombre de lignes du tableau. Répondez en JSON."
        if kind == "line_count"
        else "Extrayez les inscriptions de cette page en JSON."
    )
    return Call(kind=kind, model=MODEL, lane="index", prompt=text, pdf=pdf, pages=1, json=True)


async def test_generate_with_an_inline_page_settles_the_real_usage() -> None:
    pdf, _rows = make_index_pdf(pages=1, rows_per_page=4, seed=3)
    async with wired(EmulatorConfig(seed=1)) as (_emulator, limiter, client):
        with recording_calls() as calls:
            completion = await client.generate(page_call(pdf))
        usage = await limiter.usage(model=MODEL)
    assert '"nombre_lignes": 4' in completion.text
    assert completion.input_tokens is not None
    assert completion.input_tokens >= 258
    # tpm_counts=input: the lane holds exactly the prompt tokens the API reported (the
    # window's total also holds the phantom occupancy of a limiter's first start).
    assert usage.lanes["index"].tokens == completion.input_tokens
    assert usage.lanes["index"].requests == 1
    assert calls.calls == 1
    assert calls.input_tokens == completion.input_tokens


async def test_upload_processing_then_active_then_generate_and_delete() -> None:
    pdf, text = make_acte_pdf(pages=2, seed=5)
    config = EmulatorConfig(seed=2, processing_polls=2)
    async with wired(config) as (emulator, _limiter, client):
        uploaded = await client.upload_pdf(pdf, display_name="acte-1.pdf")
        assert uploaded.state is not None
        assert uploaded.state.name == "PROCESSING"
        active = await client.wait_active(uploaded, first_poll_s=0.01)
        completion = await client.generate(
            Call(kind="acte_extract", model=MODEL, lane="acte", prompt="Transcrivez.",
                 file=active, pages=2)
        )  # fmt: skip
        await client.delete_file(uploaded)
        files = emulator.stats()["files"]
    first_words = text.split()[:3]
    assert any(word in completion.text for word in first_words)
    assert files["deleted"] == 1
    assert files["stored"] == 0


async def test_a_file_that_fails_processing_is_a_permanent_error() -> None:
    pdf, _ = make_acte_pdf(pages=1, seed=5)
    config = EmulatorConfig(faults=(FaultRule("upload_failed", count=1),))
    async with wired(config) as (_emulator, _limiter, client):
        uploaded = await client.upload_pdf(pdf, display_name="bad.pdf")
        with pytest.raises(PermanentError, match="could not process"):
            await client.wait_active(uploaded, first_poll_s=0.01)


async def test_count_tokens_is_free_of_the_generate_quota() -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=2, seed=1)
    async with wired(EmulatorConfig()) as (_emulator, limiter, client):
        from google.genai import types

        tokens = await client.count_tokens(
            model=MODEL, parts=[types.Part.from_bytes(data=pdf, mime_type="application/pdf")]
        )
        usage = await limiter.usage(model=MODEL)
    assert tokens == 258
    assert "index" not in usage.lanes
    assert usage.requests_today == 0


@pytest.mark.parametrize("kind", ["server_error", "unavailable", "malformed_json", "bare_429"])
async def test_transient_faults_are_retried_until_success(kind: str) -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=3, seed=3)
    config = EmulatorConfig(faults=(FaultRule(kind, count=2),))
    async with wired(config) as (emulator, _limiter, client):
        with recording_calls() as calls:
            completion = await client.generate(page_call(pdf))
    assert '"nombre_lignes": 3' in completion.text
    assert calls.retries == 2
    assert emulator.stats()["models"][MODEL]["requests"] == 3


async def test_a_timeout_is_retried() -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=3)
    config = EmulatorConfig(faults=(FaultRule("hang", count=1, hang_s=30),))
    async with wired(config, timeout_s=0.5) as (_emulator, _limiter, client):
        completion = await client.generate(page_call(pdf))
    assert '"nombre_lignes": 1' in completion.text


async def test_retries_are_bounded() -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=3)
    config = EmulatorConfig(faults=(FaultRule("server_error"),))
    async with wired(config, retry=RetryPolicy(3, 60, 0.01, 0.02)) as (emulator, _limiter, client):
        with pytest.raises(GeminiUnavailable, match="after 3 attempts: HTTP 500"):
            await client.generate(page_call(pdf))
    assert emulator.stats()["models"][MODEL]["requests"] == 3


async def test_safety_block_and_invalid_request_are_permanent() -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=3)
    config = EmulatorConfig(faults=(FaultRule("safety", count=1),))
    async with wired(config) as (_emulator, _limiter, client):
        with pytest.raises(GeminiBlocked, match="SAFETY"):
            await client.generate(page_call(pdf))
        with pytest.raises(GeminiRejected, match="HTTP 400"):
            await client.generate(page_call(b"%PDF-1.4 not really a pdf"))


async def test_missing_usage_keeps_the_estimate_charged() -> None:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=3)
    config = EmulatorConfig(faults=(FaultRule("no_usage", count=1),))
    async with wired(config) as (_emulator, limiter, client):
        call = page_call(pdf)
        estimate = (await client.estimate(call)).tokens
        completion = await client.generate(call)
        usage = await limiter.usage(model=MODEL)
    assert completion.input_tokens is None
    assert usage.lanes["index"].tokens == estimate


async def test_a_429_delay_is_honoured_before_the_retry() -> None:
    """The limiter allows far more than the emulator: the 429 and its delay decide."""
    pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=3)
    config = EmulatorConfig(rpm=2, window_s=1.0)
    async with wired(config) as (emulator, limiter, client):
        await client.generate(page_call(pdf))
        await client.generate(page_call(pdf))
        started = time.monotonic()
        await client.generate(page_call(pdf))  # 429 first, then the retry
        waited = time.monotonic() - started
        usage = await limiter.usage(model=MODEL)
    stats = emulator.stats()["models"][MODEL]
    assert stats["http_429"] == 1
    assert stats["admitted"] == 3
    # Refused calls count toward RPM: the server asked for most of a window.
    assert waited >= 0.5
    assert usage.factor < 1.0  # a quota 429 teaches the limiter


async def _fleet_of_calls(
    redis_url: str,
    budget: Budget,
    emulator_config: EmulatorConfig,
    n: int,
    retry: RetryPolicy = FAST_RETRY,
) -> tuple[dict[str, Any], MemoryEstimates]:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=2, seed=9)
    pages = split_pages(open_pdf(pdf))
    estimates = MemoryEstimates()
    async with wired(emulator_config, budget, redis_url, estimates=estimates, retry=retry) as (
        emulator,
        _,
        client,
    ):
        call = Call(
            kind="index_extract",
            model=MODEL,
            lane="index",
            prompt="Extrayez les inscriptions en JSON.",
            pdf=pages[0],
            pages=1,
        )
        results = await asyncio.gather(*(client.generate(call) for _ in range(n)))
    assert len(results) == n
    return emulator.stats()["models"][MODEL], estimates


@pytest.mark.slow
async def test_200_concurrent_calls_within_the_emulators_quota_see_no_429(
    redis_url: str,
) -> None:
    # The limiter's window is the quota's plus the arrival skew allowance: a request
    # reaches the server some milliseconds after its admission, not always the same.
    budget = Budget(rpm=40, tpm=40_000, window_s=1.0 + ARRIVAL_SKEW_S)
    config = EmulatorConfig(rpm=40, tpm=40_000, window_s=1.0, tpm_counts="input")
    stats, estimates = await _fleet_of_calls(redis_url, budget, config, 200)
    assert stats["http_429"] == 0
    assert stats["admitted"] == 200
    assert stats["peak_requests"] <= 40
    # The pacing filled the quota to the brim at some point, never beyond it.
    assert stats["peak_requests"] >= 36
    # The reservations converged from the prior (5,000 output tokens) to the real usage.
    learned = await estimates.get("index_extract", model=MODEL)
    real_output = stats["output_tokens"] / stats["admitted"]
    assert abs(learned.output_mean - real_output) < 0.01 * seed_output("index_extract")


@pytest.mark.slow
async def test_without_the_limiter_the_emulator_enforces_and_calls_still_complete(
    redis_url: str,
) -> None:
    budget = Budget(rpm=100_000, tpm=100_000_000, window_s=1.0)  # far above the quota
    config = EmulatorConfig(rpm=40, tpm=40_000, window_s=1.0, tpm_counts="input")
    # With the budget 2,500 times the quota the fleet-wide pause is the only brake: every
    # pause ends in a burst that refills the server's window (rejected calls count), so a
    # call may need many attempts. Six ran out in about one run out of ten, the client's
    # default of eight once under a loaded full run; this asserts that calls get through.
    retry = dataclasses.replace(FAST_RETRY, max_attempts=16)
    stats, _ = await _fleet_of_calls(redis_url, budget, config, 100, retry)
    assert stats["http_429"] > 0
    assert stats["admitted"] == 100


async def test_estimates_are_shared_by_the_fleet_in_redis(redis_url: str) -> None:
    import redis.asyncio as aioredis

    shared = aioredis.from_url(redis_url)
    try:
        first = RedisEstimates(shared, "test", clock=lambda: 0.0)
        second = RedisEstimates(shared, "test", clock=lambda: 100.0)
        for out in (900, 1100, 900):
            await first.observe(
                "boost", model=MODEL, heuristic_in=1000, actual_in=1200, actual_out=out
            )
        learned = await second.get("boost", model=MODEL)
        other_model = await second.get("boost", model="gemini-other")
    finally:
        await shared.aclose()
    # Three calls are enough to leave the prior (25,000 output tokens) behind.
    assert learned.calls == 3
    assert learned.output_mean == pytest.approx(2900 / 3, rel=0.2)
    assert learned.ratio == pytest.approx(1.2, rel=0.01)
    assert other_model.calls == 0  # learned per model
    assert other_model.output_mean == seed_output("boost")


async def test_the_fleet_estimates_script_learns_as_the_process_does(redis_url: str) -> None:
    """``estimates.lua`` and ``Learned.observed`` give the same figures, call after call."""
    import redis.asyncio as aioredis

    from runtime.pipelines.estimates import Learned

    shared = aioredis.from_url(redis_url)
    rng = random.Random(9)
    try:
        fleet = RedisEstimates(shared, "twin-estimates", clock=lambda: 0.0)
        local = Learned("acte_extract")
        for _ in range(250):  # past MAX_CALLS: the oldest observations fade alike
            heuristic = rng.choice([0, 300, 1_000])
            actual_in, actual_out = rng.randrange(1, 2_000), rng.randrange(0, 9_000)
            await fleet.observe(
                "acte_extract",
                model=MODEL,
                heuristic_in=heuristic,
                actual_in=actual_in,
                actual_out=actual_out,
            )
            local = local.observed(
                heuristic_in=heuristic, actual_in=actual_in, actual_out=actual_out
            )
        learned = await RedisEstimates(shared, "twin-estimates").get("acte_extract", model=MODEL)
    finally:
        await shared.aclose()
    assert learned.output == pytest.approx(local.output)
    assert learned.input_ratio == pytest.approx(local.input_ratio)
