"""Injected faults: which of the next requests misbehave, and how.

A rule fires for the next ``count`` matching requests, or for a seeded ``fraction`` of them
(both: that fraction, at most ``count`` times; neither: every matching request until the
rules are cleared). Rules are tried in the order they were added; the first that fires wins.

Response faults apply to generateContent and streamGenerateContent only, AFTER the quota
admitted the request: a faulted request counts toward RPM and its tokens toward TPM, as a
real failed call is charged. ``upload_failed`` applies to uploads (the file ends FAILED),
``drop_rows`` to index extractions that do not state the expected row count.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


class FaultKind(enum.StrEnum):
    SERVER_ERROR = "server_error"  # 500 INTERNAL
    UNAVAILABLE = "unavailable"  # 503 UNAVAILABLE
    HANG = "hang"  # no answer for hang_s (longer than any client timeout), then 504
    MALFORMED_JSON = "malformed_json"  # 200 with a truncated JSON body
    NO_USAGE = "no_usage"  # a normal answer without usageMetadata
    SAFETY = "safety"  # finishReason SAFETY, no text
    BARE_429 = "bare_429"  # RESOURCE_EXHAUSTED without QuotaFailure or RetryInfo
    UPLOAD_FAILED = "upload_failed"  # the uploaded file ends FAILED
    DROP_ROWS = "drop_rows"  # index extraction leaves out the last row of the page


RESPONSE_FAULTS = frozenset(
    {
        FaultKind.SERVER_ERROR,
        FaultKind.UNAVAILABLE,
        FaultKind.HANG,
        FaultKind.MALFORMED_JSON,
        FaultKind.NO_USAGE,
        FaultKind.SAFETY,
        FaultKind.BARE_429,
    }
)


@dataclass(frozen=True)
class FaultRule:
    kind: FaultKind
    count: int | None = None
    fraction: float | None = None
    model: str | None = None
    hang_s: float = 600.0

    def __post_init__(self) -> None:
        # Accept the kind's plain name too ("safety"), as the admin endpoint does.
        object.__setattr__(self, "kind", FaultKind(self.kind))
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        if self.hang_s < 0:
            raise ValueError("hang_s must be >= 0")

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FaultRule:
        """Build a rule from the admin endpoint's JSON; raises ValueError when malformed."""
        unknown = set(payload) - {"kind", "count", "fraction", "model", "hang_s"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        try:
            kind = FaultKind(payload["kind"])
        except (KeyError, ValueError) as exc:
            kinds = ", ".join(k.value for k in FaultKind)
            raise ValueError(f"kind must be one of: {kinds}") from exc
        count, fraction = payload.get("count"), payload.get("fraction")
        model, hang_s = payload.get("model"), payload.get("hang_s", 600.0)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError("count must be an integer")
        if fraction is not None and not isinstance(fraction, int | float):
            raise ValueError("fraction must be a number")
        if model is not None and not isinstance(model, str):
            raise ValueError("model must be a string")
        if not isinstance(hang_s, int | float):
            raise ValueError("hang_s must be a number")
        return cls(kind, count, None if fraction is None else float(fraction), model, hang_s)

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class _Armed:
    rule: FaultRule
    remaining: int | None


class FaultPlan:
    """The active rules and the seeded draws that decide which requests they hit."""

    def __init__(self, rules: Iterable[FaultRule] = (), *, seed: int = 0) -> None:
        self._seed = seed
        self._rng = random.Random(f"faults:{seed}")
        self._armed: list[_Armed] = []
        self.fired: dict[str, int] = {}
        for rule in rules:
            self.add(rule)

    def add(self, rule: FaultRule) -> None:
        self._armed.append(_Armed(rule, rule.count))

    def clear(self) -> None:
        self._armed.clear()

    def reset(self, rules: Iterable[FaultRule]) -> None:
        self.clear()
        self._rng = random.Random(f"faults:{self._seed}")
        self.fired.clear()
        for rule in rules:
            self.add(rule)

    def rules(self) -> list[dict[str, Any]]:
        return [{**armed.rule.to_json(), "remaining": armed.remaining} for armed in self._armed]

    def draw(self, kinds: Iterable[FaultKind], model: str | None = None) -> FaultRule | None:
        """The rule that hits this request, if any; consumes one of its `count`."""
        wanted = set(kinds)
        for armed in list(self._armed):
            rule = armed.rule
            if rule.kind not in wanted or (rule.model is not None and rule.model != model):
                continue
            if rule.fraction is not None and self._rng.random() >= rule.fraction:
                continue
            if armed.remaining is not None:
                if armed.remaining <= 0:
                    self._armed.remove(armed)
                    continue
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._armed.remove(armed)
            self.fired[rule.kind.value] = self.fired.get(rule.kind.value, 0) + 1
            return rule
        return None
