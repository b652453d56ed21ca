"""The acte pipeline: a deed, typed or handwritten, read whole through the File API.

The PDF is uploaded once and read in one extraction call; the raw text is then corrected
by a text-only boost call, in chunks cut on paragraph boundaries when it is longer than
one call may return. The uploaded file is deleted whatever happens, cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib

from google.genai import types

from runtime.errors import PermanentError
from runtime.pipelines.common import (
    Document,
    PipelineConfig,
    PipelineResult,
    Profile,
    open_pdf,
    prompt,
)
from runtime.pipelines.gemini import Call, Completion, GeminiClient, recording_calls

LANE = "acte"


def paragraph_chunks(text: str, limit: int) -> list[str]:
    """The text cut into pieces of at most ``limit`` characters, between paragraphs.

    A paragraph longer than the limit is cut between words (a word longer than the
    limit, bluntly).
    """
    pieces: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        for fragment in _fit(paragraph, limit):
            candidate = f"{current}\n\n{fragment}" if current else fragment
            if len(candidate) <= limit:
                current = candidate
            else:
                pieces.append(current)
                current = fragment
    if current:
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def _fit(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    out: list[str] = []
    current = ""
    for word in paragraph.split(" "):
        if len(word) > limit:
            if current:
                out.append(current)
                current = ""
            while len(word) > limit:
                out.append(word[:limit])
                word = word[limit:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) <= limit:
            current = candidate
        else:
            out.append(current)
            current = word
    if current:
        out.append(current)
    return out


async def run_acte(
    row: Document, pdf: bytes, client: GeminiClient, config: PipelineConfig
) -> PipelineResult:
    """OCR one acte."""
    with recording_calls() as calls:
        # Parsing the PDF costs about as much CPU as preparing a call (half a millisecond
        # for two pages): jobs starting together take turns at it, as their calls do.
        await client.pace()
        pages = len(open_pdf(pdf).pages)
        name = (row.supabase_path or row.document_number or "acte").rsplit("/", 1)[-1]
        uploaded = await _upload(client, pdf, name[:120])
        try:
            active = await client.wait_active(uploaded, timeout_s=config.file_active_timeout_s)
            raw = await client.generate(
                Call(
                    kind="acte_extract",
                    model=config.model_acte,
                    lane=LANE,
                    prompt=prompt("acte_extract"),
                    file=active,
                    pages=pages,
                    temperature=0.1,
                    max_output_tokens=config.max_output_tokens,
                )
            )
            _refuse_truncated(raw, "transcription")
        finally:
            # Shielded: a cancelled job must still not leave its PDF on Google's side.
            await asyncio.shield(client.delete_file(uploaded))
        boosted = await _boost(client, config, raw.text)
    return PipelineResult(
        file_content=raw.text,
        boosted_file_content=boosted,
        profile=Profile.of(row.document_source, pages, calls),
    )


async def _upload(client: GeminiClient, pdf: bytes, name: str) -> types.File:
    """Upload the PDF; cancelled meanwhile, the upload still ends and its file is deleted.

    Once the bytes are sent, the file may exist on Google's side before its name is known
    here: dropping the upload would leave the PDF there for two days.
    """
    upload = asyncio.ensure_future(client.upload_pdf(pdf, display_name=name))
    try:
        return await asyncio.shield(upload)
    except asyncio.CancelledError:
        # The upload goes on, shielded: wait for its end, then delete what it stored (a
        # failed upload stored nothing).
        with contextlib.suppress(Exception):
            uploaded = await asyncio.shield(upload)
            await asyncio.shield(client.delete_file(uploaded))
        raise


def _refuse_truncated(completion: Completion, what: str) -> None:
    # A cut answer looks like a success; saving it would silently lose the end of a deed.
    if completion.finish_reason == "MAX_TOKENS":
        raise PermanentError(
            f"the acte's {what} was cut at the model's output limit "
            f"({completion.output_tokens} tokens); the deed is too long for one call"
        )


async def _boost(client: GeminiClient, config: PipelineConfig, raw: str) -> str:
    chunks = paragraph_chunks(raw, config.boost_chunk_chars)
    template = prompt("boost")
    outputs: list[str] = []
    for number, chunk in enumerate(chunks, start=1):
        part = f"(Partie {number} de {len(chunks)}.)" if len(chunks) > 1 else ""
        completion = await client.generate(
            Call(
                kind="boost",
                model=config.model_boost,
                lane=LANE,
                prompt=template.format(part=part, text=chunk),
                temperature=0.2,
                max_output_tokens=config.max_output_tokens,
            )
        )
        _refuse_truncated(completion, f"correction of part {number}")
        outputs.append(completion.text.strip())
    return "\n\n".join(outputs)
