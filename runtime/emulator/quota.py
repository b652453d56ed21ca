"""Strict rolling-window RPM/TPM arithmetic for one model: pure, the caller passes `now`.

A request arriving at time ``t`` is measured against every event in ``(t - window, t]``: an
event at ``s`` stops counting at exactly ``s + window``. Because the counts only rise when a
request arrives, checking at each arrival is enough to keep EVERY rolling window of length
``window`` within the limits.

Rules, mirroring what the Gemini API is observed to do:

- every arrival counts toward the request limit, including the ones this quota rejects
  (when ``rejected_count`` is true, the default), so a client that keeps knocking keeps
  itself locked out;
- only admitted requests count toward the token limit, at the cost given on arrival;
- ``retry_after`` is the exact time until the same request would be admitted if nothing
  else arrives, counting the rejected arrival itself; ``None`` when it can never fit
  (a limit of zero, or a request that alone exceeds the token limit).

Times are quantised to whole microseconds so that ``retry_after`` is exact: one microsecond
earlier still violates, at ``retry_after`` it fits.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

MICROS_PER_SECOND = 1_000_000


class Dimension(enum.StrEnum):
    """Which limit a request would break."""

    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True)
class Limits:
    """Requests and tokens allowed per rolling window; None means unlimited."""

    rpm: int | None
    tpm: int | None


@dataclass(frozen=True)
class Decision:
    """The outcome of one arrival."""

    admitted: bool
    violations: tuple[Dimension, ...] = ()
    retry_after: float | None = None


def to_micros(seconds: float) -> int:
    return round(seconds * MICROS_PER_SECOND)


class RollingQuota:
    """One model's request and token limits over a strict rolling window.

    Amortised O(1) per admitted request: expired events leave from the left of two deques
    with running sums; only a rejection walks the window to compute its delay.
    """

    def __init__(self, limits: Limits, window_s: float, *, rejected_count: bool = True) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.limits = limits
        self.rejected_count = rejected_count
        self._window = to_micros(window_s)
        self._last = 0
        # Every counted arrival (admitted or, if rejected_count, rejected): the RPM view.
        self._arrivals: deque[int] = deque()
        # Admitted requests with their token cost: the TPM view.
        self._grants: deque[tuple[int, int]] = deque()
        self._granted_tokens = 0
        self.peak_requests = 0
        self.peak_counted_requests = 0
        self.peak_tokens = 0

    @property
    def window_s(self) -> float:
        return self._window / MICROS_PER_SECOND

    def admit(self, now: float, tokens: int) -> Decision:
        """Count an arrival at `now` costing `tokens`, and say whether it is admitted."""
        at = self._advance(now)
        violations = self._violations(len(self._arrivals), self._granted_tokens, tokens)
        if not violations:
            self._arrivals.append(at)
            self._grants.append((at, tokens))
            self._granted_tokens += tokens
            self.peak_requests = max(self.peak_requests, len(self._grants))
            self.peak_counted_requests = max(self.peak_counted_requests, len(self._arrivals))
            self.peak_tokens = max(self.peak_tokens, self._granted_tokens)
            return Decision(admitted=True)
        if self.rejected_count:
            self._arrivals.append(at)
            self.peak_counted_requests = max(self.peak_counted_requests, len(self._arrivals))
        return Decision(
            admitted=False, violations=violations, retry_after=self._retry_after(at, tokens)
        )

    def fits(self, now: float, tokens: int) -> bool:
        """Whether a request costing `tokens` would be admitted at `now`; changes nothing."""
        requests, used = self.usage(now)
        return not self._violations(requests, used, tokens)

    def usage(self, now: float) -> tuple[int, int]:
        """Counted requests and admitted tokens in the window ending at `now`; changes nothing."""
        horizon = max(to_micros(now), self._last) - self._window
        requests = sum(1 for at in self._arrivals if at > horizon)
        used = sum(cost for at, cost in self._grants if at > horizon)
        return requests, used

    def _advance(self, now: float) -> int:
        # A clock that steps back must not resurrect expired events.
        at = max(to_micros(now), self._last)
        self._last = at
        horizon = at - self._window
        while self._arrivals and self._arrivals[0] <= horizon:
            self._arrivals.popleft()
        while self._grants and self._grants[0][0] <= horizon:
            self._granted_tokens -= self._grants.popleft()[1]
        return at

    def _violations(self, requests: int, used: int, tokens: int) -> tuple[Dimension, ...]:
        found: list[Dimension] = []
        if self.limits.rpm is not None and requests + 1 > self.limits.rpm:
            found.append(Dimension.REQUESTS)
        if self.limits.tpm is not None and used + tokens > self.limits.tpm:
            found.append(Dimension.TOKENS)
        return tuple(found)

    def _retry_after(self, at: int, tokens: int) -> float | None:
        # The request must fit every limit at once, so wait for the later of the two.
        fit_at = at
        rpm, tpm = self.limits.rpm, self.limits.tpm
        if rpm is not None:
            if rpm <= 0:
                return None
            must_leave = len(self._arrivals) + 1 - rpm
            if must_leave > 0:
                fit_at = max(fit_at, self._arrivals[must_leave - 1] + self._window)
        if tpm is not None:
            if tokens > tpm:
                return None
            excess = self._granted_tokens + tokens - tpm
            if excess > 0:
                for granted_at, cost in self._grants:
                    excess -= cost
                    if excess <= 0:
                        fit_at = max(fit_at, granted_at + self._window)
                        break
        return (fit_at - at) / MICROS_PER_SECOND
