"""Estimates learn the level and the spread of a call kind within a few calls."""

from __future__ import annotations

import random
import statistics

import pytest

from runtime.pipelines.estimates import (
    PAGE_TOKENS_GEMINI_2,
    Learned,
    MemoryEstimates,
    heuristic_input,
    page_tokens,
    seed_output,
)


def learned_from(kind: str, outputs: list[int], heuristic_in: int = 1_000) -> Learned:
    learned = Learned(kind)
    for out in outputs:
        learned = learned.observed(
            heuristic_in=heuristic_in, actual_in=heuristic_in, actual_out=out
        )
    return learned


def test_a_cold_start_reaches_the_level_within_three_calls() -> None:
    # The design note's 25,000 output tokens per acte call; real calls give about 1,500.
    assert seed_output("acte_extract") == 25_000
    means = [learned_from("acte_extract", [1_500] * n).output_mean for n in (0, 1, 2, 3)]
    assert means[0] == 25_000  # the prior alone
    assert means[1] < 2 * 1_500
    assert means[3] == pytest.approx(1_500, rel=0.06)
    # A prior below the truth is left as fast.
    assert learned_from("line_count", [1_500] * 3).output_mean == pytest.approx(1_500, rel=0.01)


def test_the_spread_is_learned_and_narrows_with_more_calls() -> None:
    rng = random.Random(4)
    outputs = [max(1, round(rng.lognormvariate(7.0, 0.8))) for _ in range(400)]
    truth = statistics.pstdev(outputs[-200:]) ** 2
    few = learned_from("boost", outputs[:3])
    many = learned_from("boost", outputs)
    # The variance of the next call: close to the data's once many calls are seen...
    assert many.output_variance == pytest.approx(truth, rel=0.35)
    # ...and wider than the spread alone while the mean itself is unsure.
    assert few.output_variance > few.output.m2 / few.output.n


def test_an_estimate_is_expected_input_and_output_with_their_variance() -> None:
    learned = learned_from("index_extract", [1_000, 1_200, 800, 1_000] * 25, heuristic_in=500)
    total = learned.estimate(500, count_output=True)
    only_input = learned.estimate(500, count_output=False)
    assert only_input.tokens == 500
    assert total.tokens == pytest.approx(500 + 1_000, rel=0.01)
    assert total.variance > only_input.variance > 0
    capped = learned.estimate(500, count_output=True, max_output=100)
    assert capped.tokens == 600


def test_a_page_costs_what_the_model_family_charges() -> None:
    assert page_tokens("gemini-2.5-flash") == PAGE_TOKENS_GEMINI_2 == 258
    assert page_tokens("models/gemini-2.0-flash") == 258
    assert page_tokens("gemini-3-pro-preview") == 560  # medium resolution, the PDF default
    assert page_tokens("gemini-3-pro-preview", "MEDIA_RESOLUTION_HIGH") == 1_120
    assert page_tokens("gemini-3-flash", "low") == 280
    assert heuristic_input(400, 2, "gemini-3-flash") == 2 * 560 + 100


async def test_learned_per_model_and_kind() -> None:
    store = MemoryEstimates()
    await store.observe("boost", model="a", heuristic_in=100, actual_in=200, actual_out=50)
    assert (await store.get("boost", model="a")).calls == 1
    assert (await store.get("boost", model="a")).ratio == pytest.approx(2, rel=0.05)
    assert (await store.get("boost", model="b")).calls == 0
