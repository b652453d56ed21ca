"""The admission arithmetic of the limiter: pure functions over one model's state.

Nothing here does I/O or reads a clock: ``now`` is passed in as integer microseconds
(never floats: the Lua twin in ``scripts/limiter.lua`` runs on doubles, and integers
below 2**53 are exact in both). The Lua script mirrors this module function by function;
``tests/integration/test_limiter_lua.py`` runs the same scenarios through both.

Algorithm: a sliding LOG for exactness plus GCRA PACING for smoothness, on requests and
tokens at once, all or nothing.

* The log holds one entry per admission (time, requests, tokens, lane) and running
  totals. Entries at or before ``now - W`` leave the log from its head, so each admission
  costs amortised O(1). They leave lazily: when a request does not fit at once, and at
  least every half window (which bounds the log). Until then the totals still count
  them, which only makes the check stricter, and a request that fits with them counted
  fits without them at the same slot: the decisions are those of an eager expiry.
* Pacing (GCRA): after an admission at ``t`` of ``c`` tokens, the next request may start
  at ``t + ceil(W / rpm)`` (tau = 0) and once the token schedule, advanced by
  ``ceil(c * W / tpm)``, is less than one request interval ahead. Admissions therefore
  arrive evenly instead of as one burst per window. A settle below the estimate, or a
  release, moves the schedule back by what it gave back (a release also gives back one
  request interval), never before ``now`` nor before the latest booking; a settle above
  the estimate moves the token schedule forward from ``now``. Pacing only smooths: the
  log alone carries the guarantees below.
* A request is booked at the earliest ``t >= max(now, pause, pacing)`` where the window
  ``(t - W, t]`` holds at most ``rpm - 1`` requests and ``tpm - c - m`` tokens, ``m`` the
  fleet margin below. Bookings never precede earlier bookings (``t`` is at least the
  request schedule, which never goes back past the latest booking), so every entry
  already in the log lies at or before ``t`` and the window check at ``t`` sees every
  entry that can share a window with the new one. A slot is booked at most a sixteenth
  of a window ahead (or two request intervals): a request that cannot start sooner is
  told when to ask again instead, so that tokens given back in the meantime serve it.
* The fleet margin. Token counts are estimates: each call reserves its EXPECTED tokens,
  and a grant id ending in ``#V`` says that its estimate has variance ``V``. The state
  sums the variances of the grants not settled yet (a settle, a release or the entry
  leaving the log takes its variance out), and every admission holds
  ``m = max(0, ceil(z * sqrt(sum)) - headroom)`` tokens beside its own, at most
  ``tpm - c``: the margin lives first in the headroom between the budget and the quota
  (``Budget.tpm_headroom``), and only what exceeds it is taken from the budget.

What is exact and what is probabilistic:

* Requests are exact: every window ``(x - W, x]`` reaches its maximum at an admission
  time ``x`` (its content only grows at entry times), and at each admission the check
  proves the window ending there within ``rpm``. Refunds, releases and the margin never
  change that: no rolling window ever holds more than ``rpm`` requests.
* Tokens are exact for what is KNOWN when deciding: no rolling window holds more than
  ``tpm`` tokens, counting settled calls at their actual size, unsettled ones at their
  estimate, and raises settled while their entry is still in the log. A raise settled
  after its entry left the log is charged as a fresh entry at the settle time,
  unchecked: the call already happened.
* The actual tokens of a window are probabilistic: its unsettled calls may turn out
  larger than their estimates. Assuming their sizes independent, their estimates
  unbiased and their sum close to normal, the window ending at an admission passes the
  quota (budget + headroom) with probability at most ``Budget.overrun_risk`` (``z`` is
  its normal quantile; ``GEMINI_OVERRUN_RISK``, default 0.1 %): the check held
  ``estimates + z * deviation`` within the quota, and the summed variance covers every
  unsettled call, in the window or not. Few unsettled calls of heavy-tailed sizes are
  where the normal approximation is weakest.

Adaptation to 429s: a quota 429 (one that names its quota) cuts the factor to 70 % of the
level that met it (never below 10 %), at most once per quarter window: the factor in
force, or what the window ``(now - W, now]`` held if less (a fleet below its budget
failed at what it sent), but no lower than 70 % of the factor, so one cut keeps between
49 % and 70 % of the factor. The factor then climbs back while no quota 429 comes:

* The ceiling is the level at which the last quota 429 arrived: the factor then, or the
  share of the budget the window actually held if lower, but never so low that the
  knee falls below the cut factor. It is remembered only when that 429 came while the
  factor was still climbing back (below 100 %). A first 429 after a full recovery sets
  no ceiling: the factor climbs back to the budget additively, +10 % of the budget per
  quiet window, in a few windows.
* Under a ceiling the climb is +10 % of the budget per window up to the knee (80 % of
  the ceiling), then +1 % of the ceiling per window up to the ceiling (twenty windows),
  then +10 % per window again: once the factor passes the ceiling without a 429 the
  ceiling no longer applies, so a raised quota is found again.
* The ceiling overestimates the quota (the level that met the 429 is above it), so the
  probe below the ceiling must be slow: measured end to end, a quota halved under a
  fleet at full speed left a ceiling about 15 % above the quota, and each probe past
  the quota costs a few 429s (calls already in flight). A lowered quota therefore costs
  one short burst of 429s every twenty-odd windows instead of one every couple of
  windows. Every climb is back at 100 % within ``RECOVERY_WINDOWS``.

After a lost state (first start, FLUSHALL, failover, idle expiry) the log is seeded with
phantom entries that spread the full budget evenly over the past window, as if the
fleet had been admitting at the paced rate. A fresh double burst is impossible; the
bound after a loss is the budget plus one phantom step (``rpm / n`` requests, ``n`` the
number of phantom entries) in the first window, exact again one window later.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import NamedTuple

PPM = 1_000_000
DAY_US = 86_400_000_000
MAX_EXACT = 2**53
MAX_TPM = 10**9  # the tokens of a window in parts per million stay exact below 2**53
FACTOR_FLOOR_PPM = 100_000  # a quota 429 never cuts the budget below 10 %
FACTOR_CUT_PPM = 700_000  # each quota 429 keeps 70 % of the level it met
RECOVERY_PPM_PER_WINDOW = 100_000  # +10 % of the budget per quiet window
KNEE_PPM = 800_000  # the fast climb stops at 80 % of the factor that met the last 429
SLOW_WINDOWS = 20  # from the knee to the ceiling: +1 % of the ceiling per quiet window
RECOVERY_WINDOWS = 40  # every climb is back at 100 % after this many quiet windows
PHANTOM_ENTRIES = 100
WALK_LIMIT = 128  # log entries one admission may read past the expired head
BATCH_SPAN_US = 10_000  # how far past the first slot one call books the waiters behind it
PHANTOM_PREFIX = "~"
# Slots are booked at most 1/16 of a window (or two paced steps) ahead: a booking holds
# its estimate until its call settles, and one made long before its slot would keep
# tokens that refunds give back in the meantime from the requests behind it.
HORIZON_PARTS = 16  # blocked by the margin alone: ask again after 1/64 of a window
SPREAD_MARK = "#"  # a grant id ending in "#V": its estimate has variance V (tokens squared)
MAX_SPREAD = 10**12  # one call's variance at most (a deviation of a million tokens)

ADMIT = 0
WAIT = 1
TOO_LARGE = 2
DAY_EXHAUSTED = 3


@dataclass(frozen=True)
class Budget:
    """What the fleet may use: requests and tokens per rolling window of ``window_s``."""

    rpm: int
    tpm: int
    window_s: float = 60.0
    # Tokens per window between this budget and the quota: the fleet margin for the
    # uncertainty of unsettled calls lives there first (see the module docstring).
    tpm_headroom: int = 0
    # The accepted probability that a window's actual tokens exceed budget + headroom.
    overrun_risk: float = 0.001
    # How far ahead a slot may be booked; None: 1/16 of the window (or two paced steps).
    booking_horizon_s: float | None = None

    def __post_init__(self) -> None:
        if self.tpm_headroom < 0:
            raise ValueError(f"tpm_headroom must be >= 0, not {self.tpm_headroom}")
        if not 0 < self.overrun_risk < 0.5:
            raise ValueError(f"overrun_risk must lie in (0, 0.5), not {self.overrun_risk}")
        if self.rpm < 1 or self.tpm < 1:
            raise ValueError(f"a budget needs rpm >= 1 and tpm >= 1, not {self.rpm}/{self.tpm}")
        if not 0.001 <= self.window_s <= 86_400:
            raise ValueError(f"window_s must lie between 1 ms and one day, not {self.window_s}")
        if self.tpm * self.window_us >= MAX_EXACT:
            raise ValueError("tpm x window in microseconds must stay below 2**53")
        if self.tpm > MAX_TPM:
            raise ValueError(f"tpm must stay at or below {MAX_TPM:,}, not {self.tpm:,}")

    @property
    def window_us(self) -> int:
        return round(self.window_s * 1_000_000)


@dataclass(frozen=True)
class Limits:
    """Everything one admission decision needs besides the state (sent to the script)."""

    window_us: int
    rpm: int
    tpm: int
    rpd: int = 0  # 0: no daily budget
    shares: tuple[tuple[str, int], ...] = ()  # (lane, parts per million), sorted
    horizon_us: int = 0  # how far ahead a slot may be booked; 0 means one window
    headroom: int = 0  # tokens above ``tpm`` that the fleet margin may use first
    z_milli: int = 0  # the margin's z-score in thousandths; 0: no margin

    @classmethod
    def of(
        cls, budget: Budget, *, rpd: int | None = None, shares: dict[str, float] | None = None
    ) -> Limits:
        lanes = tuple(sorted((lane, round(share * PPM)) for lane, share in (shares or {}).items()))
        z = NormalDist().inv_cdf(1 - budget.overrun_risk)
        w = budget.window_us
        return cls(
            w,
            budget.rpm,
            budget.tpm,
            rpd or 0,
            lanes,
            (
                round(budget.booking_horizon_s * 1_000_000)
                if budget.booking_horizon_s is not None
                else max(w // HORIZON_PARTS, 2 * ceil_div(w, budget.rpm))
            ),
            budget.tpm_headroom,
            round(z * 1000),
        )

    def divided(self, parts: int) -> Limits:
        """The share of one process out of ``parts`` (the fallback while Redis is away)."""
        parts = max(1, parts)
        return Limits(
            self.window_us,
            max(1, self.rpm // parts),
            max(1, self.tpm // parts),
            self.rpd // parts if self.rpd else 0,
            self.shares,
            self.horizon_us,
            self.headroom // parts,
            self.z_milli,
        )

    @property
    def horizon(self) -> int:
        return self.horizon_us or self.window_us


@dataclass
class Entry:
    """One admission in the log (or a phantom, or a raise charged after expiry)."""

    at: int
    requests: int
    tokens: int
    lane: str
    spread: int = 0  # the variance of an unsettled estimate, held in the fleet margin


class Decision(NamedTuple):
    """What the store answers to an admission: a booked slot, or how long to wait.

    A named tuple: one is built for every admission, and a tuple is the cheapest to build.
    """

    kind: int
    value: int  # ADMIT: the slot (µs); otherwise: microseconds to wait
    now: int  # the store's clock when it decided


@dataclass
class ModelState:
    """The limiter state of one model (one Redis hash tag)."""

    initialised: bool = False
    log: list[tuple[int, str]] = field(default_factory=list)  # (slot, member), sorted
    grants: dict[str, Entry] = field(default_factory=dict)  # by member
    requests: int = 0
    tokens: int = 0
    lane_requests: dict[str, int] = field(default_factory=dict)
    lane_tokens: dict[str, int] = field(default_factory=dict)
    lane_demand: dict[str, int] = field(default_factory=dict)
    tat_requests: int = 0
    tat_tokens: int = 0
    pause_until: int = 0
    factor_ppm: int = PPM
    factor_at: int = 0  # when a quota 429 last taught; 0: never
    ceiling_ppm: int = 0  # the factor that met the last quota 429 while climbing; 0: none
    day: int = 0  # the day (UTC, since the epoch) that day_requests counts
    day_requests: int = 0
    expired_at: int = 0  # when entries last left the log
    unsettled_var: int = 0  # summed variance of the estimates not settled yet
    last_booking: int = 0  # the latest slot booked: the schedule never goes back past it


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def _gain(elapsed: int, rate_ppm: int, window_us: int) -> int:
    """``elapsed * rate_ppm // window_us``, with every product exact below 2**53."""
    return elapsed // window_us * rate_ppm + elapsed % window_us * rate_ppm // window_us


def effective_factor(state: ModelState, now: int, window_us: int) -> int:
    """The budget factor (ppm): cut by quota 429s, climbing back additively when quiet.

    Fast up to the knee (80 % of the ceiling), slowly from the knee to the ceiling, fast
    again above it; without a ceiling, fast all the way to 100 %.
    """
    if state.factor_at == 0:
        return PPM
    elapsed = max(0, now - state.factor_at)
    if elapsed >= RECOVERY_WINDOWS * window_us:
        return PPM
    factor = state.factor_ppm
    fast = _gain(elapsed, RECOVERY_PPM_PER_WINDOW, window_us)
    ceiling = state.ceiling_ppm
    if ceiling > factor:
        knee = max(factor, ceiling * KNEE_PPM // PPM)
        if factor + fast <= knee:
            return factor + fast
        # Past the knee (``beyond``: the time since, in the fast climb's units), the
        # climb to the ceiling takes SLOW_WINDOWS windows.
        beyond = fast - (knee - factor)
        slow_span = SLOW_WINDOWS * RECOVERY_PPM_PER_WINDOW
        if beyond <= slow_span:
            return knee + beyond * (ceiling - knee) // slow_span
        # Past the ceiling without a 429: the quota was raised, climb fast again.
        factor = ceiling
        fast = beyond - slow_span
    return min(PPM, factor + fast)


def effective_limits(limits: Limits, factor: int) -> tuple[int, int]:
    return max(1, limits.rpm * factor // PPM), max(1, limits.tpm * factor // PPM)


def member(grant_id: str, requests: int, tokens: int, lane: str) -> str:
    """A log entry's name: the grant id, then what it holds (the script's zset member).

    The script keeps the whole entry in the member, so a settle or a release names the
    grant as it was booked. The NUL sorts entries of one slot by grant id, as here.
    """
    return f"{grant_id}\0{requests}:{tokens}:{lane}"


def spread_of(grant_id: str) -> tuple[str, int]:
    """A grant id without its spread mark, and the variance the mark names (0 if none)."""
    base, mark, digits = grant_id.rpartition(SPREAD_MARK)
    if not mark or not digits.isdigit():
        return grant_id, 0
    return base, min(int(digits), MAX_SPREAD)


def margin(limits: Limits, factor: int, variance: int, tokens: int, tpm: int) -> int:
    """The tokens the fleet margin takes from the budget for calls of summed ``variance``.

    ``z * sqrt(variance)`` is held above the expected tokens; the headroom between the
    budget and the quota carries it first, and only the rest is taken from the budget
    (never so much that a request of ``tokens`` could not fit an empty window).
    """
    if limits.z_milli <= 0 or variance <= 0:
        return 0
    held = math.ceil(limits.z_milli * math.sqrt(variance) / 1000)
    over = held - limits.headroom * factor // PPM
    return max(0, min(over, tpm - tokens))


def _add(state: ModelState, grant_id: str, entry: Entry) -> None:
    key = member(grant_id, entry.requests, entry.tokens, entry.lane)
    bisect.insort(state.log, (entry.at, key))
    state.grants[key] = entry
    state.requests += entry.requests
    state.tokens += entry.tokens
    state.unsettled_var += entry.spread
    if entry.lane:
        state.lane_requests[entry.lane] = state.lane_requests.get(entry.lane, 0) + entry.requests
        state.lane_tokens[entry.lane] = state.lane_tokens.get(entry.lane, 0) + entry.tokens


def _unlog(state: ModelState, key: str, entry: Entry) -> None:
    del state.log[bisect.bisect_left(state.log, (entry.at, key))]


def _subtract(state: ModelState, entry: Entry) -> None:
    state.requests -= entry.requests
    state.tokens -= entry.tokens
    state.unsettled_var -= entry.spread
    if entry.lane:
        state.lane_requests[entry.lane] -= entry.requests
        state.lane_tokens[entry.lane] -= entry.tokens


def requests_on(state: ModelState, day: int) -> int:
    """Requests admitted on ``day``: the state counts the current day only."""
    return state.day_requests if state.day == day else 0


def seed(state: ModelState, now: int, limits: Limits) -> None:
    """Start a lost state as if the past window had been used in full at the paced rate."""
    fresh = ModelState(initialised=True, tat_requests=now, tat_tokens=now)
    state.__dict__.update(fresh.__dict__)
    rpm, tpm = effective_limits(limits, PPM)
    n = min(rpm, PHANTOM_ENTRIES)
    w = limits.window_us
    for k in range(1, n + 1):
        at = now - w + ceil_div(k * w, n)
        requests = rpm * k // n - rpm * (k - 1) // n
        tokens = tpm * k // n - tpm * (k - 1) // n
        _add(state, f"{PHANTOM_PREFIX}{k}", Entry(at, requests, tokens, ""))


def expire(state: ModelState, now: int, window_us: int) -> None:
    state.expired_at = now
    cutoff = now - window_us
    gone = 0
    while gone < len(state.log) and state.log[gone][0] <= cutoff:
        _subtract(state, state.grants.pop(state.log[gone][1]))
        gone += 1
    del state.log[:gone]


def _lanes_in_use(
    state: ModelState, shares: dict[str, int], lane: str, now: int, w: int
) -> dict[str, list[int]]:
    """The other lanes that asked within the last window: they keep their unused share."""
    return {
        other: [state.lane_requests.get(other, 0), state.lane_tokens.get(other, 0)]
        for other in shares
        if other != lane and state.lane_demand.get(other, 0) > now - w
    }


def _fits(
    requests: int,
    charged: int,
    tokens: int,
    shares: dict[str, int],
    used: dict[str, list[int]],
    rpm: int,
    tpm: int,
) -> bool:
    """Room for one request of ``tokens`` beside the unused shares of the lanes in use."""
    if requests + 1 > rpm or charged + tokens > tpm:
        return False
    reserve_r = reserve_t = 0
    for lane, (lane_requests, lane_tokens) in used.items():
        reserve_r += max(0, shares[lane] * rpm // PPM - lane_requests)
        reserve_t += max(0, shares[lane] * tpm // PPM - lane_tokens)
    return rpm - requests - 1 >= reserve_r and tpm - charged - tokens >= reserve_t


def admit(
    state: ModelState,
    limits: Limits,
    now: int,
    grant_id: str,
    tokens: int,
    lane: str,
    latest: int | None = None,
) -> Decision:
    """Book one request of ``tokens`` at the earliest slot that fits, or say how long to wait.

    With ``latest``, a slot after it is refused (WAIT) instead of booked.
    """
    w = limits.window_us
    if not state.initialised:
        seed(state, now, limits)
    if now - state.expired_at >= w // 2:  # expiry is lazy: see the module docstring
        expire(state, now, w)
    if lane:
        state.lane_demand[lane] = now
    if tokens > limits.tpm:
        return Decision(TOO_LARGE, 0, now)
    day = now // DAY_US
    if limits.rpd > 0 and requests_on(state, day) >= limits.rpd:
        return Decision(DAY_EXHAUSTED, (day + 1) * DAY_US - now, now)
    factor = effective_factor(state, now, w)
    rpm, tpm = effective_limits(limits, factor)
    if tokens > tpm:
        return Decision(WAIT, w // 4, now)  # the factor climbs back by then
    shares = dict(limits.shares)
    used = _lanes_in_use(state, shares, lane, now, w)
    _, spread = spread_of(grant_id)
    held = margin(limits, factor, state.unsettled_var + spread, tokens, tpm)
    # Tokens may run one request interval ahead of their pace, so that uneven request
    # sizes average out instead of each large one stalling the next small ones.
    tolerance = ceil_div(w, rpm)
    t = max(now, state.pause_until, state.tat_requests, state.tat_tokens - tolerance)
    if (
        t - now > limits.horizon
        or (latest is not None and t > latest)
        or not _fits(state.requests, state.tokens + held, tokens, shares, used, rpm, tpm)
    ):
        # Not at once: drop what left the window, then walk the log from its head.
        expire(state, now, w)
        used = _lanes_in_use(state, shares, lane, now, w)
        requests, charged = state.requests, state.tokens + held
        i = 0
        lane_blocked = False
        while True:
            if t - now > limits.horizon:
                return Decision(WAIT, max(1000, t - now - limits.horizon), now)
            if latest is not None and t > latest:
                return Decision(WAIT, t - now, now)
            while i < len(state.log) and i < WALK_LIMIT and state.log[i][0] <= t - w:
                entry = state.grants[state.log[i][1]]
                requests -= entry.requests
                charged -= entry.tokens
                if entry.lane in used:
                    used[entry.lane][0] -= entry.requests
                    used[entry.lane][1] -= entry.tokens
                i += 1
            if _fits(requests, charged, tokens, shares, used, rpm, tpm):
                break
            if requests + 1 <= rpm and charged + tokens <= tpm:
                lane_blocked = True  # room in the budget, not beside the lanes' reserves
            if i >= len(state.log) or i >= WALK_LIMIT:
                if i >= len(state.log) and lane_blocked:
                    # Only other lanes' reserves block: they lapse when those lanes go quiet.
                    t = max(t, min(state.lane_demand[other] for other in used) + w)
                return Decision(WAIT, max(1000, t - now), now)
            t = max(t, state.log[i][0] + w)
        if lane_blocked:
            # The global budget had room earlier: booking later would push the pacing
            # past the lanes that hold the reserve, so ask again when this lane fits.
            return Decision(WAIT, max(1000, t - now), now)
    _add(state, grant_id, Entry(t, 1, tokens, lane, spread))
    state.last_booking = t
    state.tat_requests = t + ceil_div(w, rpm)
    state.tat_tokens = max(state.tat_tokens, t) + ceil_div(tokens * w, tpm)
    state.day_requests = requests_on(state, day) + 1
    state.day = day
    return Decision(ADMIT, t, now)


def admit_many(
    state: ModelState, limits: Limits, now: int, requests: Sequence[tuple[str, int]], lane: str
) -> list[Decision]:
    """Book ``(grant_id, tokens)`` requests in order; stop at the first that is not admitted.

    The decisions returned are the admissions, then (unless all were admitted) the
    decision for the first request that was not: those behind it keep their turn. The
    requests after the first are booked only within ``BATCH_SPAN_US`` of the first's slot:
    a queue books a short run of slots at once, never a long stretch of the future that
    a lane starting to ask later would have to wait behind.
    """
    decisions: list[Decision] = []
    latest = None
    for grant_id, tokens in requests:
        decision = admit(state, limits, now, grant_id, tokens, lane, latest)
        decisions.append(decision)
        if decision.kind != ADMIT:
            break
        if latest is None:
            latest = decision.value + BATCH_SPAN_US
    return decisions


def _reschedule(state: ModelState, limits: Limits, now: int, tokens: int, requests: int) -> None:
    """Move the pacing by what a settle or a release changed: back for tokens or requests
    given back (never before now nor before the latest booking, so that bookings stay in
    order), forward from now for tokens charged above the estimate."""
    w = limits.window_us
    rpm, tpm = effective_limits(limits, effective_factor(state, now, w))
    floor = max(now, state.last_booking)
    if tokens < 0 and state.tat_tokens > floor:
        back = min(-tokens, tpm) * w // tpm
        state.tat_tokens = max(floor, state.tat_tokens - back)
    elif tokens > 0:
        state.tat_tokens = max(state.tat_tokens, now) + ceil_div(min(tokens, tpm) * w, tpm)
    if requests < 0 and state.tat_requests > floor:
        state.tat_requests = max(floor, state.tat_requests + requests * ceil_div(w, rpm))


def settle(
    state: ModelState,
    limits: Limits,
    now: int,
    grant_id: str,
    estimate: int,
    actual: int,
    lane: str,
) -> int:
    """Set a grant's tokens to ``actual``; returns the tokens charged (< 0: refunded).

    The grant is found as booked (one request of ``estimate`` tokens in ``lane``). Its
    entry loses the spread mark (the margin no longer holds it), and the difference moves
    the token pacing too: a refund lets the next admissions start earlier.
    """
    expire(state, now, limits.window_us)
    key = member(grant_id, 1, estimate, lane)
    entry = state.grants.pop(key, None)
    base, _ = spread_of(grant_id)
    if entry is not None:
        _unlog(state, key, entry)
        delta = actual - estimate
        state.unsettled_var -= entry.spread
        entry.tokens = actual
        entry.spread = 0
        settled = member(base, 1, actual, lane)
        bisect.insort(state.log, (entry.at, settled))
        state.grants[settled] = entry
        state.tokens += delta
        if lane:
            state.lane_tokens[lane] += delta
        _reschedule(state, limits, now, delta, 0)
        return delta
    raised = member(base + "+", 0, actual - estimate, lane)
    if actual <= estimate or not state.initialised or raised in state.grants:
        return 0  # a refund after expiry frees nothing; a repeated raise is already charged
    _add(state, base + "+", Entry(now, 0, actual - estimate, lane))
    _reschedule(state, limits, now, actual - estimate, 0)
    return actual - estimate


def release(
    state: ModelState, limits: Limits, now: int, grant_id: str, tokens: int, lane: str
) -> bool:
    """Remove a reservation whose call never reached the API; False if it was not there.

    The grant is named as booked: one request of ``tokens`` in ``lane``. Its request and
    tokens go back to the pacing as well as to the log.
    """
    expire(state, now, limits.window_us)
    key = member(grant_id, 1, tokens, lane)
    entry = state.grants.pop(key, None)
    if entry is None:
        return False
    _unlog(state, key, entry)
    _subtract(state, entry)
    if state.day == now // DAY_US and state.day_requests > 0:
        state.day_requests -= 1
    _reschedule(state, limits, now, -tokens, -1)
    return True


def report(state: ModelState, limits: Limits, now: int, retry_after_us: int, teach: bool) -> None:
    """A 429: pause until the server's delay has passed; a quota 429 also cuts the budget."""
    w = limits.window_us
    if not state.initialised:
        seed(state, now, limits)
    expire(state, now, w)
    state.pause_until = max(state.pause_until, now + retry_after_us)
    # One cut per quarter window: a burst of 429s answers one overload, not several.
    if teach and (state.factor_at == 0 or now - state.factor_at >= w // 4):
        factor = effective_factor(state, now, w)
        # The level that failed: the factor, or what the window held if less.
        booked, _ = booked_ahead(state, now)
        used = max(
            (state.requests - booked[0]) * PPM // limits.rpm,
            (state.tokens - booked[1]) * PPM // limits.tpm,
        )
        # A fleet below its factor failed at what it sent: cut from there (at most 30 %
        # more than from the factor, for a window that held little).
        base = min(factor, max(used, factor * FACTOR_CUT_PPM // PPM))
        cut = max(FACTOR_FLOOR_PPM, base * FACTOR_CUT_PPM // PPM)
        # Met while climbing back: remember that level, but with the knee never below
        # the cut (at worst the climb is slow from the start). Met at the full budget:
        # no ceiling, the next climb goes straight back (a passing overload).
        lowest = cut * PPM // KNEE_PPM
        state.ceiling_ppm = max(lowest, min(factor, used)) if factor < PPM else 0
        state.factor_ppm = cut
        state.factor_at = now


@dataclass(frozen=True)
class Snapshot:
    """The raw figures of one model at ``now`` (the limiter turns them into ``Usage``).

    ``requests``, ``tokens`` and ``lanes`` count the window ``(now - W, now]``: the calls
    already let through (and the phantom occupancy after a lost state). Slots booked
    ahead of ``now`` are counted apart, in ``booked_requests`` and ``booked_tokens``.
    """

    now: int
    requests: int
    tokens: int
    factor_ppm: int
    pause_until: int
    requests_today: int
    lanes: dict[str, tuple[int, int]]
    booked_requests: int = 0
    booked_tokens: int = 0
    unsettled_var: int = 0  # summed variance of the estimates not settled yet


def booked_ahead(state: ModelState, now: int) -> tuple[list[int], dict[str, list[int]]]:
    """Requests and tokens booked after ``now``, in all and by lane."""
    booked = [0, 0]
    lane_booked: dict[str, list[int]] = {}
    # Bookings ahead of now sit at the tail of the log (one horizon of it at most).
    for at, key in reversed(state.log):
        if at <= now:
            break
        entry = state.grants[key]
        booked[0] += entry.requests
        booked[1] += entry.tokens
        if entry.lane:
            ahead = lane_booked.setdefault(entry.lane, [0, 0])
            ahead[0] += entry.requests
            ahead[1] += entry.tokens
    return booked, lane_booked


def snapshot(state: ModelState, limits: Limits, now: int) -> Snapshot:
    if state.initialised:
        expire(state, now, limits.window_us)
    booked, lane_booked = booked_ahead(state, now)
    lanes = {}
    for lane, requests in sorted(state.lane_requests.items()):
        ahead = lane_booked.get(lane, [0, 0])
        lanes[lane] = (requests - ahead[0], state.lane_tokens.get(lane, 0) - ahead[1])
    return Snapshot(
        now,
        state.requests - booked[0],
        state.tokens - booked[1],
        effective_factor(state, now, limits.window_us),
        state.pause_until,
        requests_on(state, now // DAY_US),
        lanes,
        booked[0],
        booked[1],
        state.unsettled_var,
    )
