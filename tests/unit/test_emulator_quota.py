"""The emulator's rolling-window quota arithmetic, on a fake clock (nothing sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.emulator.protocol import format_duration
from runtime.emulator.quota import Decision, Dimension, Limits, RollingQuota

US = 1_000_000


def at(micros: int) -> float:
    return micros / US


def test_admits_up_to_the_request_limit_then_names_it() -> None:
    quota = RollingQuota(Limits(rpm=2, tpm=None), window_s=1.0)
    assert quota.admit(0.0, 10).admitted
    assert quota.admit(0.1, 10).admitted
    refused = quota.admit(0.2, 10)
    assert refused.violations == (Dimension.REQUESTS,)
    # The refused call is counted too, so two calls (0.0 and 0.1) must leave: 0.1 + 1.0.
    assert refused.retry_after == pytest.approx(0.9)


def test_an_event_stops_counting_exactly_one_window_later() -> None:
    quota = RollingQuota(Limits(rpm=1, tpm=None), window_s=1.0, rejected_count=False)
    assert quota.admit(0.0, 0).admitted
    assert not quota.admit(at(US - 1), 0).admitted
    assert quota.admit(1.0, 0).admitted


def test_refused_calls_keep_a_hammering_client_locked_out() -> None:
    quota = RollingQuota(Limits(rpm=2, tpm=None), window_s=1.0)
    quota.admit(0.0, 0)
    quota.admit(0.1, 0)
    assert not quota.admit(0.2, 0).admitted
    # 0.0 has left, but 0.1 and the refused 0.2 still fill the window.
    late = quota.admit(1.05, 0)
    assert not late.admitted
    assert late.retry_after == pytest.approx(0.15)
    assert quota.peak_requests == 2
    assert quota.peak_counted_requests == 3


def test_without_counting_refusals_only_admitted_calls_fill_the_window() -> None:
    quota = RollingQuota(Limits(rpm=2, tpm=None), window_s=1.0, rejected_count=False)
    quota.admit(0.0, 0)
    quota.admit(0.1, 0)
    refused = quota.admit(0.2, 0)
    assert refused.retry_after == pytest.approx(0.8)
    assert quota.admit(1.05, 0).admitted


def test_token_limit_waits_for_enough_tokens_to_leave() -> None:
    quota = RollingQuota(Limits(rpm=None, tpm=100), window_s=60.0)
    assert quota.admit(0.0, 40).admitted
    assert quota.admit(10.0, 40).admitted
    refused = quota.admit(20.0, 50)
    assert refused.violations == (Dimension.TOKENS,)
    # 80 + 50 > 100 needs 30 tokens gone: the first grant (40) leaves at 60.
    assert refused.retry_after == pytest.approx(40.0)
    assert quota.fits(60.0, 50)
    assert not quota.fits(at(60 * US - 1), 50)


def test_both_limits_are_named_and_the_later_delay_wins() -> None:
    quota = RollingQuota(Limits(rpm=1, tpm=10), window_s=1.0, rejected_count=False)
    quota.admit(0.0, 10)
    refused = quota.admit(0.5, 5)
    assert refused.violations == (Dimension.REQUESTS, Dimension.TOKENS)
    assert refused.retry_after == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("limits", "tokens"),
    [(Limits(rpm=0, tpm=None), 1), (Limits(rpm=None, tpm=10), 11)],
    ids=["zero-rpm", "larger-than-tpm"],
)
def test_a_request_that_can_never_fit_has_no_delay(limits: Limits, tokens: int) -> None:
    refused = RollingQuota(limits, window_s=1.0).admit(0.0, tokens)
    assert refused == Decision(admitted=False, violations=refused.violations, retry_after=None)
    assert refused.violations


def test_no_limits_admit_everything() -> None:
    quota = RollingQuota(Limits(rpm=None, tpm=None), window_s=1.0)
    assert all(quota.admit(0.0, 10**9).admitted for _ in range(1000))
    assert quota.peak_requests == 1000


def test_a_clock_stepping_back_does_not_bring_expired_calls_back() -> None:
    quota = RollingQuota(Limits(rpm=1, tpm=None), window_s=1.0)
    quota.admit(0.0, 0)
    assert quota.admit(2.0, 0).admitted
    assert not quota.admit(0.5, 0).admitted


def test_lowering_the_limit_applies_to_the_calls_already_in_the_window() -> None:
    quota = RollingQuota(Limits(rpm=10, tpm=None), window_s=1.0)
    for step in range(3):
        quota.admit(step / 10, 0)
    quota.limits = Limits(rpm=2, tpm=None)
    assert not quota.admit(0.3, 0).admitted


def test_peaks_are_the_highest_window_not_the_total() -> None:
    quota = RollingQuota(Limits(rpm=None, tpm=None), window_s=1.0)
    for moment, tokens in [(0.0, 5), (0.5, 7), (0.9, 1), (1.6, 100), (3.0, 2)]:
        quota.admit(moment, tokens)
    assert quota.peak_requests == 3
    assert quota.peak_tokens == 101  # 0.9 and 1.6 share a window; 0.5 left at 1.5


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        RollingQuota(Limits(rpm=1, tpm=1), window_s=0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(37, "37s"), (1.25, "1.250s"), (0.000125, "0.000125s"), (1.2345671, "1.234568s")],
)
def test_retry_delays_are_written_as_durations_rounded_up(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _reference(
    history: list[tuple[int, int, bool]], now: int, tokens: int, limits: Limits, window: int
) -> bool:
    """Admission by brute force over the whole history (time, tokens, admitted)."""
    live = [(t, cost, ok) for t, cost, ok in history if t > now - window]
    if limits.rpm is not None and len(live) + 1 > limits.rpm:
        return False
    used = sum(cost for _, cost, ok in live if ok)
    return limits.tpm is None or used + tokens <= limits.tpm


arrivals = st.lists(st.tuples(st.integers(0, 400_000), st.integers(0, 60)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    arrivals=arrivals,
    rpm=st.one_of(st.none(), st.integers(1, 8)),
    tpm=st.one_of(st.none(), st.integers(1, 200)),
    window=st.integers(1, 1_000_000),
)
def test_every_rolling_window_stays_within_the_limits_and_delays_are_exact(
    arrivals: list[tuple[int, int]], rpm: int | None, tpm: int | None, window: int
) -> None:
    limits = Limits(rpm=rpm, tpm=tpm)
    quota = RollingQuota(limits, window_s=at(window))
    history: list[tuple[int, int, bool]] = []
    now = 0
    for gap, tokens in arrivals:
        now += gap
        expected = _reference(history, now, tokens, limits, window)
        decision = quota.admit(at(now), tokens)
        assert decision.admitted == expected
        history.append((now, tokens, decision.admitted))
        if decision.admitted or decision.retry_after is None:
            assert decision.admitted or (tpm is not None and tokens > tpm)
            continue
        wait = round(decision.retry_after * US)
        assert wait > 0
        # Exact: a microsecond earlier still violates; at the delay it fits.
        assert not quota.fits(at(now + wait - 1), tokens)
        assert quota.fits(at(now + wait), tokens)
        assert _reference(history, now + wait, tokens, limits, window)
        assert not _reference(history, now + wait - 1, tokens, limits, window)

    admitted = [(t, cost) for t, cost, ok in history if ok]
    for end, _ in admitted:
        in_window = [cost for t, cost in admitted if end - window < t <= end]
        assert rpm is None or len(in_window) <= rpm
        assert tpm is None or sum(in_window) <= tpm
    if admitted:
        assert quota.peak_requests == max(
            sum(1 for t, _ in admitted if end - window < t <= end) for end, _ in admitted
        )
