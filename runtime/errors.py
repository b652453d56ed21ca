"""The runtime's exception hierarchy.

Families drive behaviour: configuration errors stop the process at start, transient
errors are retried, permanent errors fail the job with a readable ``ocr_error``.
"""

from __future__ import annotations


class OcrRuntimeError(Exception):
    """The OCR runtime failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(OcrRuntimeError):
    """A setting is missing or invalid; the process cannot start."""

    def __init__(
        self, variable: str, problem: str, *, more: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.problems = ((variable, problem), *more)
        self.variable = variable
        super().__init__("; ".join(f"{name}: {what}" for name, what in self.problems))


class TransientError(OcrRuntimeError):
    """A failure that may go away if the same work is tried again later."""

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PermanentError(OcrRuntimeError):
    """A failure that trying again will not fix; the job fails with this message."""


class ServiceError(OcrRuntimeError):
    """A local service (Redis, Postgres) could not be started or reached."""
