"""The pure admission core, driven by a fake clock: exactness, conservation, behaviour."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
            decision = budget.admit(state, limits, now, f"g{n}", tokens, lane)
            if decision.kind != budget.ADMIT:
                continue
            at = decision.value
            assert at >= now
            requests, charged = window_sum(ledger, at)
            # The window ending at the new admission, with every charge known when deciding.
            assert requests + 1 <= limits.rpm
            assert charged + tokens <= limits.tpm
            ledger.append(Booked(f"g{n}", at, tokens, lane, tokens))
        elif kind == "settle" and open_grants:
            grant = open_grants[amount % len(open_grants)]
            if not raises:
                actual = min(actual, grant.estimate)
            charged = budget.settle(state, limits, now, grant.gid, grant.estimate, actual, lane)
            grant.settled = True
            if grant.at > now - W:
                assert charged == actual - grant.tokens
                grant.tokens = actual
            elif actual > grant.estimate:
                assert charged == actual - grant.estimate
                ledger.append(Booked(grant.gid + "+", now, charged, lane, 0))
            else:
                assert charged == 0
        elif kind == "release" and open_grants:
            grant = open_grants[amount % len(open_grants)]
            assert budget.release(state, limits, now, grant.gid) == (grant.at > now - W)
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
    if not raises:
        # Refunds only: every window ending at an admission holds with the final charges.
        for b in ledger:
            if not b.released:
                requests, charged = window_sum(ledger, b.at)
                assert requests <= limits.rpm
                assert charged <= limits.tpm


budgets = st.builds(
    lambda rpm, tpm, shared: Limits.of(
        Budget(rpm=rpm, tpm=tpm, window_s=1.0),
        shares={"index": 0.3, "acte": 0.5} if shared else None,
    ),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=50, max_value=800),
    st.booleans(),
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
    return Limits.of(Budget(rpm=rpm, tpm=tpm, window_s=1.0), **kwargs)  # type: ignore[arg-type]


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
    assert not state.grants.get("a")


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
    budget.report(state, limits, T0 + 1, 0, teach=True)  # the same overload: no second cut
    assert budget.effective_factor(state, T0 + 1, W) == 700_000
    budget.report(state, limits, T0 + W, 0, teach=True)
    assert budget.effective_factor(state, T0 + W, W) == 560_000
    assert budget.effective_factor(state, T0 + 3 * W, W) == 760_000
    assert budget.effective_factor(state, T0 + 6 * W, W) == budget.PPM
    plain = ModelState()
    budget.report(plain, limits, T0, 500_000, teach=False)
    assert budget.effective_factor(plain, T0, W) == budget.PPM
    assert plain.pause_until == T0 + 500_000


def test_factor_never_falls_below_the_floor() -> None:
    limits = limits_of(100, 10_000)
    state = ModelState()
    for k in range(20):
        budget.report(state, limits, T0 + k * W // 4, 0, teach=True)
    assert budget.effective_factor(state, state.factor_at, W) == budget.FACTOR_FLOOR_PPM


@pytest.mark.parametrize("other_active", [True, False])
def test_lane_keeps_its_share_and_lends_it_when_idle(other_active: bool) -> None:
    limits = limits_of(10, 100_000, shares={"index": 0.4, "acte": 0.6})
    state = ModelState()
    now = T0 + 2 * W
    budget.admit(state, limits, T0, "seed", 0, "acte")  # seeds and ages out the phantom
    state.lane_demand.clear()
    if other_active:
        budget.admit(state, limits, now, "i0", 0, "index")  # index asked: 4 kept, 1 used
    booked = 0
    for n in range(10):
        if budget.admit(state, limits, now, f"a{n}", 1, "acte").kind == budget.ADMIT:
            booked += 1
    assert booked == (6 if other_active else 10)


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
