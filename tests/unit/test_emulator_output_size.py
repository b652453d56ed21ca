"""Uncertain output sizes: the seeded factor, its statistics, and predicting an answer's usage."""

from __future__ import annotations

import argparse
import math
import random
import statistics

import pytest

from runtime.emulator import EmulatorConfig
from runtime.emulator.cli import config_from_args, configure_parser, run
from runtime.emulator.content import (
    Author,
    Document,
    Prompt,
    output_factor,
    request_key,
    scaled_output_tokens,
)
from runtime.emulator.samples import make_index_pdf

DRAWS = 4000


@pytest.fixture(scope="module")
def index_prompt() -> Prompt:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=5, seed=8)
    return Prompt(texts=("Extrayez les inscriptions.",), inline=(Document("application/pdf", pdf),))


def natural_output(prompt: Prompt) -> int:
    """The output token count the answer text gives, before any scaling."""
    return Author(seed=0).answer(prompt).usage.output_tokens


@pytest.mark.parametrize(
    "prompt",
    [
        Prompt(texts=("Bonjour",)),
        Prompt(texts=("Corrigez.\n---\n" + "mot " * 101,)),
        Prompt(texts=("Bonjour",), response_mime_type="application/json"),
    ],
    ids=["acknowledgement", "boost", "json"],
)
def test_without_variation_the_output_is_exactly_scaled_and_rounded_up(prompt: Prompt) -> None:
    natural = natural_output(prompt)
    author = Author(seed=4, output_scale=3.0, output_cv=0.0, thinking_ratio=0.5)
    for occurrence in range(3):
        answer = author.answer(prompt, occurrence=occurrence)
        assert answer.text == Author(seed=4).answer(prompt).text
        assert answer.usage.output_tokens == 3 * natural
        assert answer.usage.thoughts_tokens == math.ceil(3 * natural * 0.5)
    halved = Author(seed=4, output_scale=0.5).answer(prompt).usage.output_tokens
    assert halved == math.ceil(natural / 2)


def test_index_answers_scale_too(index_prompt: Prompt) -> None:
    natural = natural_output(index_prompt)
    assert natural > 50
    scaled = Author(seed=0, output_scale=1.37).answer(index_prompt).usage
    assert scaled.output_tokens == math.ceil(natural * 1.37)
    assert scaled.total_tokens == scaled.prompt_tokens + scaled.output_tokens


def test_rounding_is_up_at_least_one_and_capped() -> None:
    assert scaled_output_tokens(10, 1.1, None) == 11  # not 12 from 11.000000000000002
    assert scaled_output_tokens(10, 1.01, None) == 11
    assert scaled_output_tokens(3, 1e-6, None) == 1
    assert scaled_output_tokens(0, 5.0, None) == 0
    assert scaled_output_tokens(10, 3.0, 25) == 25
    assert scaled_output_tokens(10, 0.5, 25) == 5


def test_max_output_tokens_caps_the_count_and_the_text_decides_the_finish() -> None:
    prompt = Prompt(texts=("Bonjour",), max_output_tokens=40)
    natural = natural_output(prompt)
    assert natural < 40 < 3 * natural
    fits = Author(seed=0, output_scale=3.0).answer(prompt)
    assert (fits.usage.output_tokens, fits.finish_reason) == (40, "STOP")
    cut = Author(seed=0, output_scale=3.0).answer(Prompt(texts=("Bonjour",), max_output_tokens=2))
    assert (cut.usage.output_tokens, cut.finish_reason, len(cut.text)) == (2, "MAX_TOKENS", 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [0.6, 2.5])
def test_the_factor_has_the_asked_mean_and_cv(seed: int, scale: float) -> None:
    key = request_key(Prompt(texts=("Bonjour",)))
    factors = [output_factor(seed, key, n, scale, 1.0) for n in range(DRAWS)]
    # Bounds are about 5 standard errors, so any seed passes. Mean: SE = cv/sqrt(n) = 1.6%.
    assert statistics.fmean(factors) / scale == pytest.approx(1, abs=0.08)
    # Sample SD of a lognormal with cv 1 (excess kurtosis 38): SE ~ sqrt(40/n)/2 = 5%.
    assert statistics.stdev(factors) / statistics.fmean(factors) == pytest.approx(1, abs=0.25)
    # The logs are normal with sigma^2 = ln 2 and mu = ln(scale) - sigma^2/2.
    logs = [math.log(f) for f in factors]
    sigma = math.sqrt(math.log(2))
    assert statistics.fmean(logs) == pytest.approx(math.log(scale) - sigma**2 / 2, abs=0.066)
    assert statistics.stdev(logs) == pytest.approx(sigma, abs=0.05)


def test_the_factor_replays_by_seed_key_and_occurrence() -> None:
    state = random.getstate()
    key, other = request_key(Prompt(texts=("a",))), request_key(Prompt(texts=("b",)))

    def draws(seed: int, on: bytes) -> list[float]:
        return [output_factor(seed, on, n, 1.0, 0.5) for n in range(50)]

    run = draws(7, key)
    assert run == draws(7, key)
    assert len(set(run)) == 50
    for different in (draws(8, key), draws(7, other)):
        assert all(a != b for a, b in zip(run, different, strict=True))
    assert output_factor(7, key, 3, 2.0, 0.0) == 2.0
    assert random.getstate() == state  # the global generator is never used


def test_the_request_key_covers_the_content_in_order() -> None:
    pdf = Document("application/pdf", b"%PDF-1")
    base = Prompt(texts=("ab", "c"), system_texts=("s",), inline=(pdf,))
    assert request_key(base) == request_key(
        Prompt(texts=("ab", "c"), system_texts=("s",), inline=(pdf,), max_output_tokens=5)
    )
    variants = [
        Prompt(texts=("a", "bc"), system_texts=("s",), inline=(pdf,)),
        Prompt(texts=("c", "ab"), system_texts=("s",), inline=(pdf,)),
        Prompt(texts=("s", "ab", "c"), inline=(pdf,)),
        Prompt(texts=("ab", "c"), system_texts=("s",), files=(pdf,)),
        Prompt(texts=("ab", "c"), system_texts=("s",), inline=(Document("image/png", pdf.data),)),
        Prompt(texts=("ab", "c"), system_texts=("s",)),
    ]
    keys = {request_key(prompt) for prompt in variants}
    assert len(keys) == len(variants)
    assert request_key(base) not in keys


def test_a_separate_author_predicts_every_occurrence(index_prompt: Prompt) -> None:
    config = EmulatorConfig(seed=3, output_scale=1.5, output_cv=0.8, thinking_ratio=0.25)
    serving, oracle = config.author(), config.author()
    first = serving.answer(index_prompt).usage
    assert oracle.answer(index_prompt).usage == first
    assert serving.answer(index_prompt).usage == first  # answering keeps no history
    later = [serving.answer(index_prompt, occurrence=n).usage for n in range(1, 6)]
    assert later == [oracle.answer(index_prompt, occurrence=n).usage for n in range(1, 6)]
    assert len({usage.output_tokens for usage in (first, *later)}) > 1
    factor = output_factor(3, request_key(index_prompt), 0, 1.5, 0.8)
    assert first.output_tokens == scaled_output_tokens(natural_output(index_prompt), factor, None)
    assert first.thoughts_tokens == math.ceil(first.output_tokens * 0.25)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"output_scale": 0.0}, "output_scale"),
        ({"output_scale": -1.0}, "output_scale"),
        ({"output_scale": math.nan}, "output_scale"),
        ({"output_scale": math.inf}, "output_scale"),
        ({"output_cv": -0.1}, "output_cv"),
        ({"output_cv": math.nan}, "output_cv"),
    ],
)
def test_bad_output_options_are_refused_by_name(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EmulatorConfig(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        Author(seed=0, **options)
    with pytest.raises(ValueError, match="occurrence"):
        output_factor(0, b"", -1, 1.0, 0.5)


def test_the_command_line_sets_the_output_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--seed", "9", "--output-scale", "2.5", "--output-cv", "0.4"])
    config = config_from_args(args)
    assert (config.seed, config.output_scale, config.output_cv) == (9, 2.5, 0.4)
    assert config_from_args(parser.parse_args([])).output_scale == 1.0
    assert run(parser.parse_args(["--output-cv", "-1"])) == 2
    assert "output_cv" in capsys.readouterr().out
    help_text = " ".join(parser.format_help().split())
    for words in ("--output-scale", "--output-cv", "lognormal", '"input" only its prompt tokens'):
        assert words in help_text
