"""The pure admission core, driven by a fake clock: exactness, conservation, behaviour."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from statistics import NormalDist

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.limiter import budget
from runtime.limiter.budget import Budget, Limits, ModelState

T0 = 1_700_000_000_000_000
W = 1_000_000


@dataclass
class Booked:
    """The test's own ledger of one admission, independent of the core's bookkeeping."""

    gid: str
    at: int
    tokens: int  # the charge as the core currently holds it
    lane: str
    estimate: int
    settled: bool = False
    released: bool = False
    spread: int = 0


def window_sum(ledger: list[Booked], end: int) -> tuple[int, int]:
    inside = [b for b in ledger if not b.released and end - W < b.at <= end]
    requests = sum(1 for b in inside if not b.gid.endswith("+"))
    return requests, sum(b.tokens for b in inside)


operations = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 999, 30_000, 200_000, 700_000]),  # time step, µs
        st.sampled_from(["admit", "admit", "admit", "settle", "release", "report"]),
        st.integers(min_value=0, max_value=400),  # tokens, or which grant
        st.sampled_from(["index", "acte", ""]),
        st.integers(min_value=0, max_value=600),  # actual tokens
    ),
    min_size=1,
    max_size=120,
)


def run(limits: Limits, ops: list[tuple[int, str, int, str, int]], raises: bool) -> None:
    state = ModelState()
    ledger: list[Booked] = []
    now = T0
    for n, (step, kind, amount, lane, actual) in enumerate(ops):
        now += step
        open_grants = [b for b in ledger if not (b.settled or b.released or b.gid[-1] == "+")]
        if kind == "admit":
            tokens = min(amount, limits.tpm)
            # Some estimates carry a variance, held in the fleet margin until they settle.
            spread = (actual * 7) ** 2 if amount % 3 == 0 else 0
            gid = f"g{n}#{spread}" if spread else f"g{n}"
            decision = budget.admit(state, limits, now, gid, tokens, lane)
            if decision.kind != budget.ADMIT:
                continue
            at = decision.value
            assert at >= now  # nothing is admitted before its slot...
            assert all(at >= b.at for b in ledger if not b.gid.endswith("+"))  # ...nor out of order
            requests, charged = window_sum(ledger, at)
            # The window ending at the new admission, with every charge known when deciding.
            assert requests + 1 <= limits.rpm
            assert charged + tokens <= limits.tpm
            ledger.append(Booked(gid, at, tokens, lane, tokens, spread=spread))
        elif kind == "settle" and open_grants:
            grant = open_grants[amount % len(open_grants)]
            if not raises:
                actual = min(actual, grant.estimate)
            charged = budget.settle(
                state, limits, now, grant.gid, grant.estimate, actual, grant.lane
            )
            grant.settled = True
            if grant.at > now - W:
                assert charged == actual - grant.tokens
                grant.tokens = actual
            elif actual > grant.estimate:
                assert charged == actual - grant.estimate
                ledger.append(Booked(grant.gid + "+", now, charged, grant.lane, 0))
            else:
                assert charged == 0
        elif kind == "release" and open_grants:
            grant = open_grants[amount % len(open_grants)]
            released = budget.release(state, limits, now, grant.gid, grant.estimate, grant.lane)
            assert released == (grant.at > now - W)
            grant.released = True
        elif kind == "report":
            budget.report(state, limits, now, amount * 1000, actual % 2 == 0)
    # Conservation: the core's totals are the phantom plus exactly the ledger's charges.
    budget.expire(state, now, W)
    live = [b for b in ledger if not b.released and b.at > now - W]
    phantom = [e for gid, e in state.grants.items() if gid.startswith(budget.PHANTOM_PREFIX)]
    assert state.tokens == sum(b.tokens for b in live) + sum(e.tokens for e in phantom)
    assert state.requests == sum(1 for b in live if b.gid[-1] != "+") + sum(
        e.requests for e in phantom
    )
    for lane in ("index", "acte"):
        assert state.lane_tokens.get(lane, 0) == sum(b.tokens for b in live if b.lane == lane)
    # The margin holds the variance of the live grants not settled yet, no more, no less.
    assert state.unsettled_var == sum(b.spread for b in live if not b.settled)
    # The snapshot's window is (now - W, now]; the bookings ahead of now count apart.
    snap = budget.snapshot(state, limits, now)
    ahead = [b for b in live if b.at > now]
    assert (snap.booked_requests, snap.booked_tokens) == (
        sum(1 for b in ahead if b.gid[-1] != "+"),
        sum(b.tokens for b in ahead),
    )
    assert (snap.requests, snap.tokens) == (
        state.requests - snap.booked_requests,
        state.tokens - snap.booked_tokens,
    )
    for lane in ("index", "acte"):
        if lane in snap.lanes:
            inside = [b for b in live if b.lane == lane and b.at <= now]
            assert snap.lanes[lane] == (
                sum(1 for b in inside if b.gid[-1] != "+"),
                sum(b.tokens for b in inside),
            )
    if not raises:
        # Refunds only: every window ending at an admission holds with the final charges.
        for b in ledger:
            if not b.released:
                requests, charged = window_sum(ledger, b.at)
                assert requests <= limits.rpm
                assert charged <= limits.tpm


budgets = st.builds(
    lambda rpm, tpm, shared, headroom: Limits.of(
        Budget(rpm=rpm, tpm=tpm, window_s=1.0, tpm_headroom=headroom),
        shares={"index": 0.3, "acte": 0.5} if shared else None,
    ),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=50, max_value=800),
    st.booleans(),
    st.sampled_from([0, 100, 10_000]),
)


@settings(max_examples=300, deadline=None)
@given(limits=budgets, ops=operations)
def test_no_window_exceeds_the_budget_and_settle_conserves(
    limits: Limits, ops: list[tuple[int, str, int, str, int]]
) -> None:
    run(limits, ops, raises=True)


@settings(max_examples=200, deadline=None)
@given(limits=budgets, ops=operations)
def test_with_refunds_only_every_final_window_holds(
    limits: Limits, ops: list[tuple[int, str, int, str, int]]
) -> None:
    run(limits, ops, raises=False)


def limits_of(rpm: int, tpm: int, **kwargs: object) -> Limits:
    """Limits that may book a whole window ahead, so that pacing shows in one call each."""
    limits = Limits.of(Budget(rpm=rpm, tpm=tpm, window_s=1.0), **kwargs)  # type: ignore[arg-type]
    return dataclasses.replace(limits, horizon_us=W)


def test_slots_are_booked_a_sixteenth_of_a_window_ahead_at_most() -> None:
    limits = Limits.of(Budget(rpm=1_000, tpm=1_000_000, window_s=1.0))
    assert limits.horizon == W // budget.HORIZON_PARTS
    state = warm(limits)
    now = T0 + 3 * W
    decisions = [budget.admit(state, limits, now, f"g{n}", 1, "") for n in range(100)]
    booked = [d.value for d in decisions if d.kind == budget.ADMIT]
    assert max(booked) - now <= limits.horizon
    refused = decisions[len(booked)]
    assert refused.kind == budget.WAIT  # told when to ask again, not booked far ahead
    # Few requests per window: two paced steps ahead at least.
    assert Limits.of(Budget(rpm=4, tpm=100, window_s=1.0)).horizon == W // 2


def test_admissions_are_paced_evenly_not_burst() -> None:
    limits = limits_of(10, 10_000)
    state = ModelState()
    slots = [budget.admit(state, limits, T0, f"g{n}", 1, "").value for n in range(10)]
    gaps = {b - a for a, b in itertools.pairwise(slots)}
    assert gaps == {W // 10}


def test_token_pacing_spaces_a_large_request_from_the_next() -> None:
    limits = limits_of(1_000, 1_000)
    state = ModelState()
    first = budget.admit(state, limits, T0 + 2 * W, "a", 500, "")
    second = budget.admit(state, limits, T0 + 2 * W, "b", 1, "")
    # 500 tokens at 1,000 per window: half a window, less one request interval of slack.
    assert second.value - first.value == W // 2 - W // 1_000


def test_a_lost_state_does_not_grant_a_fresh_burst() -> None:
    limits = limits_of(10, 1_000)
    state = ModelState()
    decision = budget.admit(state, limits, T0, "a", 1, "")
    assert decision.kind == budget.ADMIT
    assert decision.value == T0 + W // 10  # one paced step, not the whole budget at once


def test_booking_beyond_the_horizon_says_when_to_ask_again() -> None:
    limits = limits_of(10, 1_000)
    state = ModelState()
    budget.report(state, limits, T0, 3 * W, teach=False)
    decision = budget.admit(state, limits, T0, "a", 1, "")
    assert decision.kind == budget.WAIT
    assert decision.value == 2 * W
    assert not [key for key in state.grants if key.startswith("a\0")]


def test_oversized_request_and_spent_day() -> None:
    state = ModelState()
    assert budget.admit(state, limits_of(5, 100), T0, "a", 101, "").kind == budget.TOO_LARGE
    daily = limits_of(5, 100, rpd=1)
    assert budget.admit(state, daily, T0, "b", 1, "").kind == budget.ADMIT
    spent = budget.admit(state, daily, T0 + W, "c", 1, "")
    assert spent.kind == budget.DAY_EXHAUSTED
    assert spent.value == (T0 // budget.DAY_US + 1) * budget.DAY_US - (T0 + W)


def test_quota_429_cuts_multiplicatively_and_recovers_additively() -> None:
    limits = limits_of(100, 10_000)
    state = ModelState()
    budget.report(state, limits, T0, 0, teach=True)
    assert budget.effective_factor(state, T0, W) == 700_000
    assert state.ceiling_ppm == 0  # met at the full budget: no ceiling
    budget.report(state, limits, T0 + 1, 0, teach=True)  # the same overload: no second cut
    assert budget.effective_factor(state, T0 + 1, W) == 700_000
    # No ceiling: +10 % per quiet window, straight back to the budget.
    assert budget.effective_factor(state, T0 + 2 * W, W) == 900_000
    assert budget.effective_factor(state, T0 + 3 * W, W) == budget.PPM
    plain = ModelState()
    budget.report(plain, limits, T0, 500_000, teach=False)
    assert budget.effective_factor(plain, T0, W) == budget.PPM
    assert plain.pause_until == T0 + 500_000


SENT = itertools.count()


def send_at_the_limit(state: ModelState, limits: Limits, start: int, end: int) -> int:
    """One sender as fast as the limiter admits, from ``start`` to ``end``; returns the end."""
    now = start
    while now < end:
        decision = budget.admit(state, limits, now, f"s{next(SENT)}", 1, "")
        now = decision.value if decision.kind == budget.ADMIT else now + decision.value
    return now


def test_the_ceiling_is_the_level_that_met_the_429() -> None:
    limits = limits_of(100, 1_000_000)
    state = ModelState()
    now = send_at_the_limit(state, limits, T0, T0 + 2 * W)
    budget.report(state, limits, now, 0, teach=True)
    assert state.ceiling_ppm == 0  # met at the full budget: no ceiling
    assert state.factor_ppm == 700_000
    now = send_at_the_limit(state, limits, now, now + 2 * W)  # saturated while climbing
    factor = budget.effective_factor(state, now, W)
    budget.report(state, limits, now, 0, teach=True)
    assert factor < budget.PPM
    assert factor - 60_000 <= state.ceiling_ppm <= factor  # what the window held
    # A fleet that used 80 % of its budget (at a factor of 90 %) failed at 80 %.
    busy = ModelState()
    budget.report(busy, limits, T0, 0, teach=True)
    for k in range(80):
        budget.admit(busy, limits, T0 + W + 1 + k * W // 80, f"b{k}", 1, "")
    budget.report(busy, limits, T0 + 2 * W, 0, teach=True)
    assert (busy.factor_ppm, busy.ceiling_ppm) == (560_000, 800_000)  # cut from 80 %
    # One that used a third: cut to 49 % of the factor at most, and the ceiling stays
    # where the knee is the cut factor, so the climb is slow from the start.
    idle = ModelState()
    budget.report(idle, limits, T0, 0, teach=True)
    for k in range(33):
        budget.admit(idle, limits, T0 + W + 1 + k * W // 33, f"i{k}", 1, "")
    budget.report(idle, limits, T0 + 2 * W, 0, teach=True)
    assert (idle.factor_ppm, idle.ceiling_ppm) == (441_000, 551_250)
    # Five windows later: 5 % of the way from the knee (the cut factor) to the ceiling.
    assert budget.effective_factor(idle, T0 + 7 * W, W) == 441_000 + 110_250 // 4


def test_under_a_ceiling_the_climb_slows_between_knee_and_ceiling() -> None:
    state = ModelState(factor_ppm=560_000, factor_at=T0, ceiling_ppm=800_000)
    t = T0
    assert budget.effective_factor(state, t, W) == 560_000
    # Fast (+10 %/window) up to the knee, 80 % of the ceiling: 64 %.
    assert budget.effective_factor(state, t + W // 2, W) == 610_000
    assert budget.effective_factor(state, t + 8 * W // 10, W) == 640_000
    # Then +1 % of the ceiling per window: twenty windows up to the ceiling.
    assert budget.effective_factor(state, t + 18 * W // 10, W) == 648_000
    assert budget.effective_factor(state, t + 108 * W // 10, W) == 720_000
    assert budget.effective_factor(state, t + 208 * W // 10, W) == 800_000
    # Past the ceiling without a 429: forgotten, fast again to the configured budget.
    assert budget.effective_factor(state, t + 218 * W // 10, W) == 900_000
    assert budget.effective_factor(state, t + 228 * W // 10, W) == budget.PPM
    assert budget.effective_factor(state, t + 30 * W, W) == budget.PPM
    # A 429 after the full recovery clears the ceiling again.
    budget.report(state, limits_of(100, 10_000), t + 30 * W, 0, teach=True)
    assert state.ceiling_ppm == 0
    assert budget.effective_factor(state, t + 33 * W, W) == budget.PPM


@settings(max_examples=200, deadline=None)
@given(
    reports=st.lists(st.integers(min_value=0, max_value=3 * W), min_size=1, max_size=12),
    window_s=st.sampled_from([1.0, 60.0, 86_400.0]),
)
def test_the_factor_climbs_monotonically_and_continuously(
    reports: list[int], window_s: float
) -> None:
    limits = Limits.of(Budget(rpm=100, tpm=10_000, window_s=window_s))
    w = limits.window_us
    state = ModelState()
    now = T0
    for gap in reports:
        now += gap * w // W
        budget.report(state, limits, now, 0, teach=True)
        assert budget.FACTOR_FLOOR_PPM <= state.factor_ppm < budget.PPM
    step = w // 20
    previous = budget.effective_factor(state, now, w)
    for k in range(1, 20 * (budget.RECOVERY_WINDOWS + 1)):
        factor = budget.effective_factor(state, now + k * step, w)
        assert previous <= factor <= budget.PPM
        # Never more than the fast rate over one step (+ rounding).
        assert factor - previous <= budget.RECOVERY_PPM_PER_WINDOW // 20 + 1
        previous = factor
    assert previous == budget.PPM


def simulated_429s(quota: int, windows: int, *, memory: bool) -> list[int]:
    """The windows in which a fleet meets a 429 under a real quota of ``quota`` requests.

    The fleet (one sender, as fast as the limiter of 100 requests per window admits)
    gets a 429 whenever its call makes the real rolling window exceed ``quota``; the
    rejected call still counts, as at the API.
    """
    limits = limits_of(100, 1_000_000)
    state = ModelState()
    calls: list[int] = []
    hits = []
    now, end, n = T0, T0 + windows * W, 0
    while now < end:
        decision = budget.admit(state, limits, now, f"c{n}", 1, "")
        n += 1
        if decision.kind != budget.ADMIT:
            now += decision.value
            continue
        now = decision.value
        calls.append(now)
        if sum(1 for at in calls[-200:] if at > now - W) > quota:
            budget.report(state, limits, now, W // 20, teach=True)
            if not memory:
                state.ceiling_ppm = 0
            hits.append((now - T0) // W)
    return hits


@pytest.mark.parametrize("quota", [30, 50, 62, 85])
def test_a_lowered_quota_is_met_rarely_once_learned(quota: int) -> None:
    # Without memory the factor probes past the quota every couple of windows.
    forgetful = [w for w in simulated_429s(quota, 60, memory=False) if w >= 10]
    learned = [w for w in simulated_429s(quota, 60, memory=True) if w >= 10]
    assert len(forgetful) >= 12, forgetful
    assert len(learned) <= 3, learned  # about one 429 in twenty windows


def test_a_raised_quota_is_found_again() -> None:
    limits = limits_of(100, 1_000_000)
    state = ModelState()
    budget.report(state, limits, T0, 0, teach=True)
    now = send_at_the_limit(state, limits, T0, T0 + 2 * W)
    budget.report(state, limits, now, 0, teach=True)  # the ceiling: about 85 %
    ceiling = state.ceiling_ppm
    assert 800_000 <= ceiling <= 900_000
    # No more 429s: the ceiling is passed and the full budget is back within 25 windows.
    assert budget.effective_factor(state, now + 22 * W, W) > ceiling
    assert budget.effective_factor(state, now + 25 * W, W) == budget.PPM


def test_usage_counts_the_window_ending_now_and_bookings_apart() -> None:
    limits = limits_of(10, 1_000)
    state = ModelState()
    budget.admit(state, limits, T0, "seed", 1, "")  # seeds; phantom and seed age out
    now = T0 + 3 * W
    slots = [budget.admit(state, limits, now, f"g{n}", 10, "x").value for n in range(5)]
    assert slots == [now + n * W // 10 for n in range(5)]
    snap = budget.snapshot(state, limits, now)
    assert (snap.requests, snap.tokens, snap.booked_requests, snap.booked_tokens) == (
        1,
        10,
        4,
        40,
    )
    assert snap.lanes == {"x": (1, 10)}
    later = budget.snapshot(state, limits, now + 25 * W // 100)
    assert (later.requests, later.booked_requests) == (3, 2)
    assert later.lanes == {"x": (3, 30)}
    done = budget.snapshot(state, limits, now + W // 2)
    assert (done.requests, done.tokens, done.booked_requests, done.booked_tokens) == (5, 50, 0, 0)


def test_a_saturated_window_never_reads_above_the_budget() -> None:
    limits = limits_of(10, 100_000)
    state = ModelState()
    now = T0
    for n in range(200):  # a backlog that always books as far ahead as it may
        decision = budget.admit(state, limits, now, f"g{n}", 1, "")
        if decision.kind != budget.ADMIT:
            now += W // 20
            snap = budget.snapshot(state, limits, now)
            assert snap.requests <= limits.rpm
            assert snap.requests + snap.booked_requests == state.requests


def test_settle_twice_and_settle_after_expiry() -> None:
    limits = limits_of(10, 1_000)
    state = ModelState()
    at = budget.admit(state, limits, T0, "a", 100, "x").value
    assert budget.settle(state, limits, at, "a", 100, 40, "x") == -60
    assert budget.settle(state, limits, at, "a", 100, 40, "x") == 0
    at = budget.admit(state, limits, at, "b", 100, "x").value
    later = at + 2 * W
    assert budget.settle(state, limits, later, "b", 100, 50, "x") == 0  # refund dropped
    assert budget.settle(state, limits, later, "b", 100, 150, "x") == 50  # raise at now
    assert budget.settle(state, limits, later, "b", 100, 150, "x") == 0
    assert state.lane_tokens["x"] == 50


def warm(limits: Limits) -> ModelState:
    """A state seeded at T0: its phantom window is gone by T0 + 2 W."""
    state = ModelState()
    budget.admit(state, limits, T0, "warm", 0, "")
    return state


def test_a_refund_moves_the_token_schedule_back_but_never_before_now() -> None:
    limits = limits_of(1_000, 1_000)
    state = warm(limits)
    now = T0 + 3 * W
    first = budget.admit(state, limits, now, "a", 800, "")
    assert first.kind == budget.ADMIT
    # Paced by its estimate, the next request would wait most of a window...
    before = state.tat_tokens
    assert before - now > W // 2
    # ...but the call used 100 tokens: the schedule moves back by the 700 given back.
    budget.settle(state, limits, now + 1_000, "a", 800, 100, "")
    assert state.tat_tokens == before - 700 * W // 1_000
    second = budget.admit(state, limits, now + 1_000, "b", 100, "")
    assert second.kind == budget.ADMIT
    assert second.value < now + W // 4
    # A refund larger than the schedule ahead stops at now, never before it.
    budget.settle(state, limits, now + 2_000, "b", 100, 0, "")
    assert state.tat_tokens >= now + 2_000
    third = budget.admit(state, limits, now + 2_000, "c", 1, "")
    assert third.value >= max(now + 2_000, second.value)


def test_a_settle_above_the_estimate_pushes_the_schedule_forward() -> None:
    limits = limits_of(1_000, 1_000)
    state = warm(limits)
    now = T0 + 3 * W
    budget.admit(state, limits, now, "a", 100, "")
    before = state.tat_tokens
    budget.settle(state, limits, now + 1_000, "a", 100, 400, "")
    assert state.tat_tokens == before + 300 * W // 1_000


def test_a_release_gives_the_request_and_its_tokens_back_to_the_pacing() -> None:
    limits = limits_of(10, 1_000)
    state = warm(limits)
    now = T0 + 3 * W
    first = budget.admit(state, limits, now, "a", 500, "")
    assert budget.release(state, limits, now + 10, "a", 500, "")
    # The released slot was the last booking: the next one may take it, not earlier.
    again = budget.admit(state, limits, now + 10, "b", 500, "")
    assert again.kind == budget.ADMIT
    assert again.value == max(now + 10, first.value)


def test_the_margin_lives_in_the_headroom_first_then_in_the_budget() -> None:
    z = NormalDist().inv_cdf(1 - 0.001)
    quiet = Limits.of(Budget(rpm=100, tpm=1_000, window_s=1.0, tpm_headroom=400))
    assert quiet.z_milli == round(z * 1000)
    # z x 100 = 309 tokens of margin: inside the headroom of 400, nothing is held back.
    assert budget.margin(quiet, budget.PPM, 100**2, 10, 1_000) == 0
    # z x 300 = 927: 527 above the headroom come out of the budget.
    assert budget.margin(quiet, budget.PPM, 300**2, 10, 1_000) == 927 - 400
    # Never so much that the request itself could not fit an empty window.
    assert budget.margin(quiet, budget.PPM, 10_000**2, 10, 1_000) == 990


def test_unsettled_variance_blocks_until_the_calls_settle() -> None:
    limits = Limits.of(Budget(rpm=100, tpm=1_000, window_s=1.0, tpm_headroom=0))
    limits = dataclasses.replace(limits, horizon_us=W)
    state = warm(limits)
    now = T0 + 3 * W
    # Two unsure calls of 100 tokens (deviation 150 each): margin z x 212 = 656.
    for gid in ("a#22500", "b#22500"):
        assert budget.admit(state, limits, now, gid, 100, "").kind == budget.ADMIT
    assert state.unsettled_var == 45_000
    blocked = budget.admit(state, limits, now + 1, "c", 300, "")
    assert blocked.kind == budget.WAIT  # not before both have left the window
    # Once they settle, their variance leaves the margin and the request fits.
    budget.settle(state, limits, now + 2, "a#22500", 100, 120, "")
    budget.settle(state, limits, now + 3, "b#22500", 100, 80, "")
    assert state.unsettled_var == 0
    assert budget.admit(state, limits, now + 4, "c", 300, "").kind == budget.ADMIT


def test_an_unsettled_grant_leaving_the_log_takes_its_variance_along() -> None:
    limits = Limits.of(Budget(rpm=100, tpm=1_000, window_s=1.0))
    state = warm(limits)
    now = T0 + 3 * W
    budget.admit(state, limits, now, "lost#900", 10, "")  # its process died mid-call
    assert state.unsettled_var == 900
    budget.expire(state, now + 2 * W, W)
    assert state.unsettled_var == 0


def test_spread_marks_are_read_from_grant_ids() -> None:
    assert budget.spread_of("p.1#25") == ("p.1", 25)
    assert budget.spread_of("p.1") == ("p.1", 0)
    assert budget.spread_of("p#x") == ("p#x", 0)
    assert budget.spread_of(f"p#{10**15}") == ("p", budget.MAX_SPREAD)
