"""What every pipeline shares: its inputs, its result, its profile, its prompts."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

import pypdf
from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

from runtime.errors import PermanentError
from runtime.pipelines.gemini import CallLog

# What pypdf raises on a damaged file, while opening it or later reading its pages: its
# own errors, and plain Python ones from the structures it walks (a page that is not a
# dictionary, a reference to nothing, a loop of references).
PDF_DAMAGE: tuple[type[Exception], ...] = (
    PyPdfError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RecursionError,
)


class Document(Protocol):
    """The parts of a queue row a pipeline may look at."""

    @property
    def document_source(self) -> str: ...

    @property
    def document_number(self) -> str | None: ...

    @property
    def supabase_path(self) -> str | None: ...


@dataclass(frozen=True)
class PipelineConfig:
    """Models and limits of the pipelines (from the settings)."""

    model_index: str = "gemini-2.5-pro"
    model_acte: str = "gemini-2.5-flash"
    model_boost: str = "gemini-2.5-pro"
    index_max_pages: int = 60
    pages_in_flight: int = 4  # per document, so one large index cannot hog the process
    boost_chunk_chars: int = 120_000  # about 30K output tokens, well under one call's limit
    file_active_timeout_s: float = 300.0
    unreadable_retries: int = 2
    max_output_tokens: int | None = None  # None: the model's own limit


@dataclass(frozen=True)
class Profile:
    """What one job cost, for logs and the capacity planner."""

    document_source: str
    pages: int
    calls: int
    retries: int
    rate_limited: int
    input_tokens: int
    output_tokens: int
    limiter_wait_s: float
    duration_s: float

    @classmethod
    def of(cls, source: str, pages: int, calls: CallLog) -> Profile:
        """The profile of a job whose calls were recorded in ``calls``, ending now."""
        return cls(
            document_source=source,
            pages=pages,
            calls=calls.calls,
            retries=calls.retries,
            rate_limited=calls.rate_limited,
            input_tokens=calls.input_tokens,
            output_tokens=calls.output_tokens,
            limiter_wait_s=round(calls.limiter_wait_s, 3),
            duration_s=round(time.monotonic() - calls.started, 3),
        )


@dataclass(frozen=True)
class PipelineResult:
    """What is written back to the row, and what it cost."""

    file_content: str
    boosted_file_content: str
    profile: Profile


@cache
def prompt(name: str) -> str:
    """A prompt file shipped in ``runtime/pipelines/prompts``."""
    files = resources.files("runtime.pipelines.prompts")
    return files.joinpath(f"{name}.txt").read_text(encoding="utf-8").strip()


def open_pdf(data: bytes, *, max_pages: int | None = None) -> pypdf.PdfReader:
    """A readable PDF, or a PermanentError saying in plain words what is wrong with it."""
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise PermanentError("the document is not a PDF (no %PDF header)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise PermanentError("the PDF is encrypted with a password")
        pages = len(reader.pages)
    except FileNotDecryptedError as exc:
        raise PermanentError("the PDF is encrypted with a password") from exc
    except DependencyError as exc:  # an encryption this installation cannot undo
        raise PermanentError(f"the PDF is encrypted and cannot be opened ({exc})") from exc
    except PDF_DAMAGE as exc:
        raise PermanentError(f"the PDF is damaged and cannot be read ({exc})") from exc
    if pages == 0:
        raise PermanentError("the PDF has no pages")
    if max_pages is not None and pages > max_pages:
        raise PermanentError(f"the PDF has {pages} pages, more than the limit of {max_pages}")
    return reader


def decisive(failures: BaseExceptionGroup[Exception]) -> Exception:
    """The one failure that decides a job's fate among those of its concurrent parts.

    A permanent error wins (trying again will not help); otherwise the first one.
    """
    flat: list[Exception] = []

    def walk(group: BaseExceptionGroup[Exception]) -> None:
        for exc in group.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                flat.append(exc)

    walk(failures)
    return next((e for e in flat if isinstance(e, PermanentError)), flat[0])
