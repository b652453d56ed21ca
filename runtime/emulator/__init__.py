"""An emulator of the Gemini REST API that the real google-genai SDK talks to unchanged.

It answers land-registry prompts believably and deterministically, enforces per-model
RPM/TPM quotas over a strict rolling window, and injects faults on demand.
"""

from __future__ import annotations

from runtime.emulator.config import EmulatorConfig, TpmCounts
from runtime.emulator.content import (
    Answer,
    AnswerKind,
    Author,
    Document,
    Prompt,
    Usage,
    output_factor,
    request_key,
)
from runtime.emulator.faults import FaultKind, FaultPlan, FaultRule
from runtime.emulator.files import FileState
from runtime.emulator.quota import Decision, Dimension, Limits, RollingQuota
from runtime.emulator.samples import (
    IndexRow,
    format_row,
    make_acte_pdf,
    make_corrupt_pdf,
    make_empty_pdf,
    make_encrypted_pdf,
    make_imageonly_pdf,
    make_index_pdf,
    parse_row,
)
from runtime.emulator.server import Emulator

__all__ = [
    "Answer",
    "AnswerKind",
    "Author",
    "Decision",
    "Dimension",
    "Document",
    "Emulator",
    "EmulatorConfig",
    "FaultKind",
    "FaultPlan",
    "FaultRule",
    "FileState",
    "IndexRow",
    "Limits",
    "Prompt",
    "RollingQuota",
    "TpmCounts",
    "Usage",
    "format_row",
    "make_acte_pdf",
    "make_corrupt_pdf",
    "make_empty_pdf",
    "make_encrypted_pdf",
    "make_imageonly_pdf",
    "make_index_pdf",
    "output_factor",
    "parse_row",
    "request_key",
]
