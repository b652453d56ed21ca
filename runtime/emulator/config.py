"""Settings of one emulator instance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from runtime.emulator.content import Author, check_output_spread
from runtime.emulator.faults import FaultRule
from runtime.emulator.quota import Limits

TpmCounts = Literal["total", "input"]


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulated API behaves. Limits of None mean unlimited.

    The defaults are the quota the original system was sized against (2,000 RPM and
    8M TPM per model over a 60 s window), counting input tokens as Google does.
    """

    host: str = "127.0.0.1"
    port: int = 0
    rpm: int | None = 2000
    tpm: int | None = 8_000_000
    window_s: float = 60.0
    tpm_counts: TpmCounts = "input"
    latency_ms: float = 0.0
    latency_per_output_token_ms: float = 0.0
    processing_polls: int = 1
    seed: int = 0
    # model -> (rpm, tpm), for models whose quota differs from the default.
    model_quotas: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)
    faults: tuple[FaultRule, ...] = ()
    # The real API counts refused calls toward RPM; turning this off shows what a
    # friendlier server would do.
    rejected_count_rpm: bool = True
    # Thinking tokens reported per output token (0 leaves thoughtsTokenCount out).
    thinking_ratio: float = 0.0
    require_api_key: bool = True
    # Output sizes: each answer's output token count is the text's times a seeded lognormal
    # factor of this mean and coefficient of variation (0: exactly output_scale).
    output_scale: float = 1.0
    output_cv: float = 0.0

    def __post_init__(self) -> None:
        if self.tpm_counts not in ("total", "input"):
            raise ValueError("tpm_counts must be 'total' or 'input'")
        if self.window_s <= 0:
            raise ValueError("window_s must be positive")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if min(self.latency_ms, self.latency_per_output_token_ms, self.thinking_ratio) < 0:
            raise ValueError("latencies and thinking_ratio must be >= 0")
        if self.processing_polls < 0:
            raise ValueError("processing_polls must be >= 0")
        check_output_spread(self.output_scale, self.output_cv)
        for limit in (
            self.rpm,
            self.tpm,
            *(v for pair in self.model_quotas.values() for v in pair),
        ):
            if limit is not None and limit < 0:
                raise ValueError("quota limits must be >= 0")

    def author(self) -> Author:
        """A fresh `Author` writing exactly the answers this configuration serves.

        The emulator uses one; a client building its own in any process can predict the
        usage of a request's first answer with ``config.author().answer(prompt).usage``.
        """
        return Author(
            self.seed,
            thinking_ratio=self.thinking_ratio,
            output_scale=self.output_scale,
            output_cv=self.output_cv,
        )

    def limits_for(self, model: str) -> Limits:
        rpm, tpm = self.model_quotas.get(model, (self.rpm, self.tpm))
        return Limits(rpm=rpm, tpm=tpm)
