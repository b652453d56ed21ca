"""The OCR pipelines, their document sources and the limited Gemini client."""

from __future__ import annotations

from runtime.pipelines.acte import run_acte
from runtime.pipelines.common import PipelineConfig, PipelineResult, Profile
from runtime.pipelines.documents import DocumentStore, open_documents
from runtime.pipelines.gemini import Call, CallLog, Completion, GeminiClient, RetryPolicy
from runtime.pipelines.index import run_index

__all__ = [
    "Call",
    "CallLog",
    "Completion",
    "DocumentStore",
    "GeminiClient",
    "PipelineConfig",
    "PipelineResult",
    "Profile",
    "RetryPolicy",
    "open_documents",
    "run_acte",
    "run_index",
]
