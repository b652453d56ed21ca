"""Token estimates for reservations: an expected size and how unsure it is, learned fast.

A reservation is made before the call, from what is known then: the model, the pages and
the prompt. Per call kind and model the fleet learns, from the usage the API reports, the
output tokens (mean and variance) and the ratio of real input tokens to a heuristic (a
page cost per model family, about 4 characters a token). The figures are shared by the
fleet in Redis.

Learning is a running (Welford) mean and variance over the observed calls, the oldest
fading once ``MAX_CALLS`` are counted. The original system's figures are a weak prior:
they weigh ``PRIOR_WEIGHT`` of one call, so the first real calls replace them (within
about 5 % after three calls even when the prior is fifteen times too large). The spread
starts from a prior coefficient of variation that weighs one call, and the expectation
of the next call adds the uncertainty of the mean itself (predictive variance), so a
kind seen a few times is reserved with a wider spread than one seen a thousand times.
The limiter reserves the expected tokens of each call and holds one fleet margin for the
summed variances of the calls not yet settled (``runtime.limiter.budget``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions

CHARS_PER_TOKEN = 4
MAX_CALLS = 200  # observations counted at most: older ones fade, so a drift is followed
PRIOR_WEIGHT = 0.01  # the prior's weight in the mean, in calls
PRIOR_OUTPUT_CV = 0.5  # the prior's coefficient of variation of output tokens (weight 1)
PRIOR_INPUT_CV = 0.2  # likewise for the input ratio: a page cost may be off for a model
MAX_OUTPUT_TOKENS = 65_536  # a learned output is never reserved above this

# Output tokens per call kind in the original system (design note): the weak prior.
SEED_OUTPUT_TOKENS: Mapping[str, float] = {
    "line_count": 100,
    "index_extract": 5_000,
    "index_recount": 5_000,
    "acte_extract": 25_000,
    "boost": 25_000,
}
_DEFAULT_OUTPUT = 2_000

# Prompt tokens of one PDF page. Gemini 2.x: 258 a page. Gemini 3 counts a page by its
# media resolution (280, 560 or 1,120; PDFs default to medium). The learned input ratio
# corrects either from what usage_metadata reports.
PAGE_TOKENS_GEMINI_2 = 258
PAGE_TOKENS_GEMINI_3 = {"low": 280, "medium": 560, "high": 1_120}


def page_tokens(model: str, media_resolution: str | None = None) -> int:
    """The prompt tokens of one PDF page on ``model`` (before the learned correction)."""
    name = model.rsplit("/", 1)[-1]
    if name.startswith("gemini-") and name[7:8].isdigit() and int(name[7:8]) >= 3:
        resolution = (media_resolution or "medium").lower().removeprefix("media_resolution_")
        return PAGE_TOKENS_GEMINI_3.get(resolution, PAGE_TOKENS_GEMINI_3["medium"])
    return PAGE_TOKENS_GEMINI_2


def heuristic_input(prompt_chars: int, pages: int, model: str = "") -> int:
    return pages * page_tokens(model) + math.ceil(prompt_chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Moments:
    """A running mean and sum of squared deviations over ``n`` (fading) observations."""

    n: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> Moments:
        """One more observation (mirrored by ``estimates.lua``)."""
        kept = min(self.n, MAX_CALLS - 1)
        m2 = self.m2 * kept / self.n if self.n > 0 else 0.0
        n = kept + 1
        delta = x - self.mean
        mean = self.mean + delta / n
        return Moments(n, mean, max(0.0, m2 + delta * (x - mean)))

    def expected(self, prior: float) -> float:
        """The mean, the prior weighing ``PRIOR_WEIGHT`` of one observation."""
        return (PRIOR_WEIGHT * prior + self.n * self.mean) / (PRIOR_WEIGHT + self.n)

    def predictive_variance(self, prior: float, prior_cv: float) -> float:
        """The variance of the next observation: spread plus the mean's own uncertainty."""
        expected = self.expected(prior)
        spread = ((prior_cv * expected) ** 2 + self.m2) / (1 + self.n)
        return spread * (1 + 1 / (1 + self.n))


@dataclass(frozen=True)
class Estimate:
    """What one call reserves: expected tokens, their variance, and the raw input guess."""

    tokens: int
    variance: int
    heuristic_input: int


@dataclass(frozen=True)
class Learned:
    """What the fleet has learned about one call kind on one model."""

    kind: str
    output: Moments = Moments()
    input_ratio: Moments = Moments()

    @property
    def calls(self) -> float:
        return self.output.n

    @property
    def output_mean(self) -> float:
        return self.output.expected(seed_output(self.kind))

    @property
    def output_variance(self) -> float:
        return self.output.predictive_variance(seed_output(self.kind), PRIOR_OUTPUT_CV)

    @property
    def ratio(self) -> float:
        return self.input_ratio.expected(1.0)

    def estimate(
        self, heuristic_in: int, *, count_output: bool, max_output: int | None = None
    ) -> Estimate:
        """The expected tokens of a call and their variance, input and output independent."""
        tokens = heuristic_in * self.ratio
        ratio_var = self.input_ratio.predictive_variance(1.0, PRIOR_INPUT_CV)
        variance = heuristic_in**2 * ratio_var
        if count_output:
            cap = min(max_output or MAX_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)
            tokens += min(self.output_mean, cap)
            variance += min(self.output_variance, float(cap) ** 2)
        return Estimate(max(1, math.ceil(tokens)), math.ceil(variance), heuristic_in)

    def observed(self, *, heuristic_in: int, actual_in: int, actual_out: int) -> Learned:
        ratio = self.input_ratio
        if heuristic_in > 0 and actual_in > 0:
            ratio = ratio.add(actual_in / heuristic_in)
        return Learned(self.kind, self.output.add(actual_out), ratio)


def seed_output(kind: str) -> float:
    return SEED_OUTPUT_TOKENS.get(kind, _DEFAULT_OUTPUT)


class EstimateStore(Protocol):
    """Where the learned figures live: Redis for a fleet, memory for one process."""

    async def get(self, kind: str, *, model: str) -> Learned: ...

    async def observe(
        self, kind: str, *, model: str, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None: ...


class MemoryEstimates:
    """Learned figures of this process alone."""

    def __init__(self) -> None:
        self._learned: dict[tuple[str, str], Learned] = {}

    async def get(self, kind: str, *, model: str) -> Learned:
        return self._learned.get((model, kind)) or Learned(kind)

    async def observe(
        self, kind: str, *, model: str, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None:
        learned = await self.get(kind, model=model)
        self._learned[(model, kind)] = learned.observed(
            heuristic_in=heuristic_in, actual_in=actual_in, actual_out=actual_out
        )


def _moments(values: list[float]) -> Moments:
    return Moments(values[0], values[1], values[2])


class RedisEstimates:
    """Learned figures shared by the fleet; falls back to memory while Redis is away.

    Reads are cached for a moment: an estimate needs to be recent, not exact, and a read
    per call would double the Redis round trips of every model call. A kind seen only a
    few times is read again sooner, and an observation refreshes the cache with the
    fleet's figures at once, so a cold start learns within a few calls.
    """

    _TTL_S = 7 * 24 * 3600  # forgotten after a week without calls of that kind
    _CACHE_S = 5.0
    _CACHE_YOUNG_S = 0.5  # while a kind has fewer than _YOUNG calls
    _YOUNG = 20

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._key = f"{namespace}:estimates"
        self._local = MemoryEstimates()
        self._cache: dict[tuple[str, str], tuple[float, Learned]] = {}
        self._clock = clock
        script = resources.files("runtime.pipelines").joinpath("estimates.lua").read_text()
        self._update = client.register_script(script)

    async def get(self, kind: str, *, model: str) -> Learned:
        cached = self._cache.get((model, kind))
        if cached is not None:
            age = self._clock() - cached[0]
            young = cached[1].calls < self._YOUNG
            if age < (self._CACHE_YOUNG_S if young else self._CACHE_S):
                return cached[1]
        learned = await self._read(kind, model)
        self._cache[(model, kind)] = (self._clock(), learned)
        return learned

    def _fields(self, kind: str, model: str) -> list[str]:
        prefix = f"{model}/{kind}"
        return [f"{prefix}:{name}" for name in ("n", "mean", "m2", "rn", "rmean", "rm2")]

    async def _read(self, kind: str, model: str) -> Learned:
        try:
            values = await self._client.hmget(self._key, self._fields(kind, model))
        except redis.exceptions.RedisError:
            return await self._local.get(kind, model=model)
        numbers = [float(v) for v in values if v is not None]
        if len(numbers) != len(values):
            return await self._local.get(kind, model=model)
        return Learned(kind, _moments(numbers[:3]), _moments(numbers[3:]))

    async def observe(
        self, kind: str, *, model: str, heuristic_in: int, actual_in: int, actual_out: int
    ) -> None:
        await self._local.observe(
            kind,
            model=model,
            heuristic_in=heuristic_in,
            actual_in=actual_in,
            actual_out=actual_out,
        )
        try:
            reply = await self._update(
                keys=[self._key],
                args=[
                    f"{model}/{kind}",
                    MAX_CALLS,
                    heuristic_in,
                    actual_in,
                    actual_out,
                    self._TTL_S,
                ],
            )
        except redis.exceptions.RedisError:
            return  # learning is best effort; the local figures carry on
        numbers = [float(v) for v in reply]
        learned = Learned(kind, _moments(numbers[:3]), _moments(numbers[3:]))
        self._cache[(model, kind)] = (self._clock(), learned)
