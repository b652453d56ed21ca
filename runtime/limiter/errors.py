"""Errors the limiter raises to its callers, in the runtime's exception families."""

from __future__ import annotations

from runtime.errors import PermanentError, TransientError


class RequestTooLarge(PermanentError):
    """The request asks for more tokens than the whole budget: it can never be admitted."""

    def __init__(self, tokens: int, tpm: int, model: str) -> None:
        self.tokens = tokens
        self.tpm = tpm
        super().__init__(
            f"a {model} request of {tokens} tokens exceeds the whole budget of {tpm} tokens "
            "per window; split the input or raise the budget"
        )


class DailyQuotaExhausted(TransientError):
    """The requests-per-day budget of this model is spent until midnight UTC."""

    def __init__(self, model: str, rpd: int, retry_after_s: float) -> None:
        super().__init__(
            f"{model}: the daily budget of {rpd} requests is spent; "
            f"it renews in {retry_after_s:.0f} s (midnight UTC)",
            retry_after_s=retry_after_s,
        )


class StoreUnavailable(TransientError):
    """The shared limiter state (Redis) cannot be reached."""
