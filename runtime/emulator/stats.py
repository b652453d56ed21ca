"""Counters of one emulator run, per model, in the JSON shape `GET /_emulator/stats` serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.emulator.quota import RollingQuota


@dataclass
class ModelCounters:
    """What happened to one model's generate calls.

    ``requests`` counts every call that reached the model; ``admitted`` those the quota let
    in (including ones that then failed validation or were faulted); ``rejected`` the quota
    refusals. Tokens are those charged to admitted calls that got as far as an answer,
    faulted ones included (a failed call is charged like a real one); ``invalid`` calls
    cost nothing.
    """

    requests: int = 0
    admitted: int = 0
    rejected: int = 0
    http_429: int = 0
    invalid: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    total_tokens: int = 0

    def snapshot(self, quota: RollingQuota, tpm_counts: str, now: float) -> dict[str, Any]:
        window_requests, window_tokens = quota.usage(now)
        return {
            "requests": self.requests,
            "admitted": self.admitted,
            "rejected": self.rejected,
            "http_429": self.http_429,
            "invalid": self.invalid,
            "faults": dict(self.faults),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "thoughts_tokens": self.thoughts_tokens,
            "total_tokens": self.total_tokens,
            # Highest counts over any rolling window: admitted requests, all counted
            # arrivals (what RPM is measured on), and tokens as TPM counts them.
            "peak_requests": quota.peak_requests,
            "peak_counted_requests": quota.peak_counted_requests,
            "peak_tokens": quota.peak_tokens,
            # What the rolling window ending now holds (counted arrivals, tokens).
            "window_requests": window_requests,
            "window_tokens": window_tokens,
            "limits": {
                "rpm": quota.limits.rpm,
                "tpm": quota.limits.tpm,
                "window_s": quota.window_s,
                "tpm_counts": tpm_counts,
            },
        }
