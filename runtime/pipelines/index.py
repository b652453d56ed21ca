"""The index pipeline: a scanned table of inscriptions, page by page.

Each page is sent alone, twice: once to count the table's rows, once to extract them.
When the extraction finds fewer records than the count, the page is read once more with
the expected count in the prompt and the better answer is kept; any gap left is recorded.
The pages are merged into one document: JSON for ``file_content``, readable text for
``boosted_file_content``.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pypdf

from runtime.errors import PermanentError
from runtime.pipelines.common import (
    PDF_DAMAGE,
    Document,
    PipelineConfig,
    PipelineResult,
    Profile,
    decisive,
    open_pdf,
    prompt,
)
from runtime.pipelines.gemini import (
    Call,
    GeminiBlocked,
    GeminiClient,
    GeminiRejected,
    GeminiUnavailable,
    recording_calls,
)
from runtime.pipelines.parsing import (
    LineCount,
    UnreadableAnswer,
    read_inscriptions,
    read_line_count,
)

LANE = "index"
T = TypeVar("T")


class UnreadablePage(PermanentError):
    """The model's answers about a page could not be read, however often asked."""


@dataclass(frozen=True)
class PageResult:
    page: int
    line_count: int
    line_count_confidence: float | None
    records: list[dict[str, Any]]
    reread: bool

    @property
    def gap(self) -> int:
        return max(0, self.line_count - len(self.records))


def split_pages(reader: pypdf.PdfReader) -> list[bytes]:
    """Each page as a PDF of its own; a page pypdf cannot copy is a PermanentError.

    A PDF whose table of pages reads fine can still hold damaged pages: pypdf only walks
    a page when it is copied.
    """
    pages = []
    for number in range(1, len(reader.pages) + 1):
        try:
            writer = pypdf.PdfWriter()
            writer.add_page(reader.pages[number - 1])
            buffer = io.BytesIO()
            writer.write(buffer)
        except PDF_DAMAGE as exc:
            raise PermanentError(
                f"the PDF is damaged and cannot be read (page {number}: {exc})"
            ) from exc
        pages.append(buffer.getvalue())
    return pages


async def _ask(
    client: GeminiClient,
    call: Call,
    read: Callable[[str], T],
    config: PipelineConfig,
    page: int,
) -> T:
    """Call, then read the answer; an unreadable answer is asked again a few times."""
    problem = ""
    for _ in range(config.unreadable_retries + 1):
        try:
            completion = await client.generate(call)
        except (GeminiBlocked, GeminiRejected, GeminiUnavailable) as exc:
            # The same failure, saying which page of the document it concerns.
            raise type(exc)(f"page {page}: {exc}") from exc
        try:
            return read(completion.text)
        except UnreadableAnswer as exc:
            problem = str(exc)
    raise UnreadablePage(
        f"page {page}: the model's {call.kind} answer could not be read: {problem}"
    )


async def _read_page(
    client: GeminiClient, config: PipelineConfig, number: int, pdf: bytes
) -> PageResult:
    def call(kind: str, text: str) -> Call:
        return Call(
            kind=kind,
            model=config.model_index,
            lane=LANE,
            prompt=text,
            pdf=pdf,
            pages=1,
            temperature=0.1,
            json=True,
        )

    async with asyncio.TaskGroup() as group:
        counting = group.create_task(
            _ask(client, call("line_count", prompt("line_count")), read_line_count, config, number)
        )
        extracting = group.create_task(
            _ask(
                client,
                call("index_extract", prompt("index_extract")),
                read_inscriptions,
                config,
                number,
            )
        )
    count: LineCount = counting.result()
    records: list[dict[str, Any]] = extracting.result()
    reread = False
    if len(records) < count.count:
        reread = True
        text = prompt("index_recount").format(found=len(records), expected=count.count)
        try:
            again: list[dict[str, Any]] = await _ask(
                client, call("index_recount", text), read_inscriptions, config, number
            )
        except UnreadablePage:
            again = []  # the first reading stands; the gap is recorded below
        if len(again) > len(records):
            records = again
    return PageResult(
        page=number,
        line_count=count.count,
        line_count_confidence=count.confidence,
        records=records,
        reread=reread,
    )


def render_text(document: dict[str, Any]) -> str:
    """A plain-text rendering of the merged index, for people."""
    lines = [
        f"Index {document.get('document_number') or ''}".rstrip(),
        f"{document['page_count']} pages, {document['total_records']} inscriptions "
        f"({document['total_lines']} lignes comptées)",
        "",
    ]
    for page in document["pages"]:
        lines.append(f"--- Page {page['page']} ---")
        for record in page["records"]:
            fields = [record["numero_publication"], record["date"], record["nature"]]
            lines.append(" | ".join(f for f in fields if f) + f" | {record['parties']}")
            extra = "; ".join(f"{k}: {record[k]}" for k in ("radiation", "remarques") if record[k])
            if extra:
                lines.append(f"    {extra}")
        if page["gap"]:
            lines.append(f"    [{page['gap']} ligne(s) comptée(s) sans inscription lue]")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


async def run_index(
    row: Document, pdf: bytes, client: GeminiClient, config: PipelineConfig
) -> PipelineResult:
    """OCR one index document."""
    with recording_calls() as calls:
        # Parsing and splitting the PDF is CPU work of the same order as preparing calls:
        # jobs starting together take turns at it (see ``Pacer``).
        await client.pace()
        reader = open_pdf(pdf, max_pages=config.index_max_pages)
        pages = split_pages(reader)
        slots = asyncio.Semaphore(config.pages_in_flight)

        async def bounded(number: int, page: bytes) -> PageResult:
            async with slots:
                return await _read_page(client, config, number, page)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(bounded(n, p)) for n, p in enumerate(pages, start=1)]
        except ExceptionGroup as failures:
            raise decisive(failures) from None
        results = [task.result() for task in tasks]

    document = {
        "document_source": row.document_source,
        "document_number": row.document_number,
        "page_count": len(results),
        "total_lines": sum(r.line_count for r in results),
        "total_records": sum(len(r.records) for r in results),
        "gaps": [{"page": r.page, "missing": r.gap} for r in results if r.gap],
        "models": sorted(calls.models),
        "pages": [
            {
                "page": r.page,
                "line_count": r.line_count,
                "line_count_confidence": r.line_count_confidence,
                "reread": r.reread,
                "gap": r.gap,
                "records": r.records,
            }
            for r in results
        ],
    }
    return PipelineResult(
        file_content=json.dumps(document, ensure_ascii=False),
        boosted_file_content=render_text(document),
        profile=Profile.of(row.document_source, len(results), calls),
    )
