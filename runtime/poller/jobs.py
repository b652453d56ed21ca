"""What the poller hands to a pipeline and gets back, and the retry arithmetic.

Pure values and functions only: no I/O, no clock. The backoff takes its random source as
an argument so that tests can pin it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from uuid import UUID

from runtime.errors import OcrRuntimeError, TransientError

# Status ids of the extractor's ``extraction_status`` table.
READY = 3
FAILED = 4
DONE = 5
IN_OCR = 6

# Rows of this type skip OCR: the extractor marks them done itself.
NEVER_CLAIMED = "plan_cadastraux"

# Rows claimed by another system (the original worker, run side by side) carry no claim id
# and no lease of ours: that system's own sweep owns them; they are taken back only when
# far older than any healthy job, in case that system is gone.
FOREIGN_CLAIM_TIMEOUT_S = 1800.0

# ocr_error is free text; a runaway traceback must not bloat the row.
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed ``extraction_queue`` row, as a pipeline needs it."""

    id: UUID
    document_source: str
    document_number: str | None
    supabase_path: str | None
    circonscription_fonciere: str | None
    cadastre: str | None
    acte_type: str | None
    attempts: int
    """``ocr_attempts`` after this claim: 1 on the first try."""
    max_attempts: int
    claim_id: UUID
    """Fencing token: every write about this job applies only under this claim."""


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a successful pipeline writes back."""

    file_content: str
    boosted_file_content: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """The outcome of one recovery sweep."""

    requeued: int
    """Rows of lost workers put back to ready."""
    failed: int
    """Rows of lost workers that had used up their attempts."""


class StoreUnavailableError(TransientError):
    """The queue database cannot be reached right now."""


def backoff_s(
    attempts: int,
    *,
    base_s: float,
    max_s: float,
    rng: random.Random | None = None,
    at_least_s: float | None = None,
) -> float:
    """How long a failed row waits before it may be claimed again.

    Exponential in the attempts already made, capped, with jitter over the upper half of
    the step so that rows failing together (a provider outage) do not come back together.
    A server-given delay (``retry_after``) is a floor.
    """
    step = min(max_s, base_s * 2.0 ** max(attempts - 1, 0))
    draw = (rng or random).random()
    delay = step / 2.0 + draw * step / 2.0
    if at_least_s is not None:
        delay = max(delay, at_least_s)
    return delay


def error_text(exc: BaseException) -> str:
    """The ``ocr_error`` for a failure: our own errors by message, others by type too."""
    text = str(exc) if isinstance(exc, OcrRuntimeError) else f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_CHARS]
