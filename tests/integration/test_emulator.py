"""The Gemini emulator driven by the real google-genai SDK over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types
from pypdf import PdfReader, PdfWriter

from runtime.emulator import (
    Document,
    Emulator,
    EmulatorConfig,
    FaultKind,
    FaultRule,
    IndexRow,
    Prompt,
    make_acte_pdf,
    make_corrupt_pdf,
    make_empty_pdf,
    make_encrypted_pdf,
    make_index_pdf,
)

PRO = "gemini-2.5-pro"
FLASH = "gemini-2.5-flash"
LINE_COUNT_PROMPT = "Indiquez le nombre de lignes d'inscription de cette page, en JSON."
EXTRACTION_PROMPT = "Extrayez toutes les inscriptions de cette page d'index, en JSON."


class FakeClock:
    """The emulator's quota clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Injected into the SDK: its own session subclasses aiohttp.ClientSession, which aiohttp
    # deprecates with a warning, and the test run treats warnings as errors.
    async with aiohttp.ClientSession() as http:
        yield http


def sdk(
    emulator: Emulator,
    http: aiohttp.ClientSession,
    *,
    version: str = "v1beta",
    timeout_ms: int | None = None,
) -> genai.Client:
    return genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(
            base_url=emulator.base_url,
            api_version=version,
            aiohttp_client=http,
            timeout=timeout_ms,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


@asynccontextmanager
async def running(
    http: aiohttp.ClientSession, config: EmulatorConfig | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Emulator, genai.Client]]:
    async with Emulator(config or EmulatorConfig(seed=7), **kwargs) as emulator:
        yield emulator, sdk(emulator, http)


@pytest.fixture
async def emu(
    session: aiohttp.ClientSession,
) -> AsyncIterator[tuple[Emulator, genai.Client]]:
    async with running(session) as pair:
        yield pair


def page_of(pdf: bytes, index: int) -> bytes:
    """One page as its own PDF, as the index pipeline sends it."""
    writer = PdfWriter()
    writer.add_page(PdfReader(io.BytesIO(pdf)).pages[index])
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_part(data: bytes) -> types.Part:
    return types.Part.from_bytes(data=data, mime_type="application/pdf")


def records(text: str) -> list[IndexRow]:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    return [IndexRow(**record) for record in json.loads(body)]


def quota_details(error: errors.APIError) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for detail in error.details["error"].get("details", []):
        found[detail["@type"].rsplit(".", 1)[-1]] = detail
    return found


def seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


async def generate(
    client: genai.Client, *contents: Any, model: str = PRO, **config: Any
) -> types.GenerateContentResponse:
    return await client.aio.models.generate_content(
        model=model,
        contents=list(contents),
        config=types.GenerateContentConfig(**config) if config else None,
    )


# -- answers ---------------------------------------------------------------------------


async def test_index_page_line_count_and_extraction_round_trip(
    emu: tuple[Emulator, genai.Client],
) -> None:
    _, client = emu
    pdf, rows = make_index_pdf(pages=3, rows_per_page=[6, 4, 0], seed=11)
    for index, expected in enumerate(rows):
        page = page_of(pdf, index)
        counted = await generate(client, pdf_part(page), LINE_COUNT_PROMPT, temperature=0.1)
        assert json.loads(counted.text or "") == {"nombre_lignes": len(expected), "confiance": 0.95}
        extracted = await generate(client, pdf_part(page), EXTRACTION_PROMPT)
        assert records(extracted.text or "") == expected
        usage = extracted.usage_metadata
        assert usage is not None
        assert usage.prompt_token_count == 258 + -(-len(EXTRACTION_PROMPT) // 4)
        assert usage.candidates_token_count == -(-len(extracted.text or "") // 4)
        assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
        modalities = {d.modality: d.token_count for d in usage.prompt_tokens_details or []}
        assert modalities[types.MediaModality.DOCUMENT] == 258


async def test_json_mode_extraction_is_bare_json(emu: tuple[Emulator, genai.Client]) -> None:
    _, client = emu
    pdf, rows = make_index_pdf(pages=4, rows_per_page=3, seed=5)
    for index in range(4):
        answer = await generate(
            client,
            pdf_part(page_of(pdf, index)),
            EXTRACTION_PROMPT,
            response_mime_type="application/json",
        )
        assert [IndexRow(**r) for r in json.loads(answer.text or "")] == rows[index]


async def test_answers_are_the_same_for_the_same_seed(session: aiohttp.ClientSession) -> None:
    pdf, _ = make_acte_pdf(pages=1, seed=2)
    texts = []
    for _ in range(2):
        async with running(session, EmulatorConfig(seed=3, processing_polls=0)) as (_, client):
            uploaded = await client.aio.files.upload(
                file=io.BytesIO(pdf), config=types.UploadFileConfig(mime_type="application/pdf")
            )
            part = types.Part.from_uri(file_uri=uploaded.uri or "", mime_type="application/pdf")
            texts.append((await generate(client, part, "Transcrivez", model=FLASH)).text)
    assert texts[0] == texts[1]


async def test_uploaded_acte_is_processing_then_active_and_transcribed(
    session: aiohttp.ClientSession,
) -> None:
    pdf, source = make_acte_pdf(pages=3, seed=4)
    async with running(session, EmulatorConfig(seed=1, processing_polls=2)) as (emulator, client):
        uploaded = await client.aio.files.upload(
            file=io.BytesIO(pdf),
            config=types.UploadFileConfig(mime_type="application/pdf", display_name="acte.pdf"),
        )
        assert uploaded.state == types.FileState.PROCESSING
        assert uploaded.size_bytes == len(pdf)
        assert uploaded.name
        assert uploaded.uri == f"{emulator.base_url}/v1beta/{uploaded.name}"
        assert uploaded.expiration_time
        assert uploaded.create_time
        assert uploaded.expiration_time > uploaded.create_time
        part = types.Part.from_uri(file_uri=uploaded.uri, mime_type="application/pdf")
        with pytest.raises(errors.ClientError) as early:
            await generate(client, part, "Transcrivez tout le texte.", model=FLASH)
        assert (early.value.code, early.value.status) == (400, "FAILED_PRECONDITION")

        states = [(await client.aio.files.get(name=uploaded.name or "")).state for _ in range(3)]
        assert states == [types.FileState.PROCESSING] * 2 + [types.FileState.ACTIVE]

        answer = await generate(client, part, "Transcrivez tout le texte.", model=FLASH)
        words, original = (answer.text or "").split(), source.split()
        assert len(words) == len(original)
        marked = [i for i, word in enumerate(words) if word in ("[?]", "[ILLISIBLE]")]
        assert 0.01 * len(words) < len(marked) < 0.08 * len(words)
        assert all(
            w == o for w, o in zip(words, original, strict=True) if w not in ("[?]", "[ILLISIBLE]")
        )
        usage = answer.usage_metadata
        assert usage is not None
        assert usage.prompt_token_count == 3 * 258 + -(-len("Transcrivez tout le texte.") // 4)

        await client.aio.files.delete(name=uploaded.name or "")
        files = emulator.stats()["files"]
        assert files == {"uploaded": 1, "deleted": 1, "stored": 0, "failed": 0}
        with pytest.raises(errors.ClientError) as gone:
            await client.aio.files.get(name=uploaded.name or "")
        assert (gone.value.code, gone.value.status) == (404, "NOT_FOUND")
        with pytest.raises(errors.ClientError) as unknown:
            await generate(client, part, "Transcrivez", model=FLASH)
        assert unknown.value.code == 404


async def test_boost_returns_the_text_after_the_separator_cleaned(
    emu: tuple[Emulator, genai.Client],
) -> None:
    _, client = emu
    prompt = (
        "Corrigez et structurez le texte brut ci-dessous.\n---\n"
        "Le  vendeur [?] déclare   que\nl'immeuble est libre.\n\n\nSignature [ILLISIBLE]"
    )
    answer = await generate(client, prompt, temperature=0.2)
    assert answer.text == "Le vendeur déclare que l'immeuble est libre.\n\nSignature [ILLISIBLE]"
    assert answer.candidates
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP

    cut = await generate(client, prompt, max_output_tokens=3)
    assert cut.text == "Le vendeur d"
    assert cut.candidates
    assert cut.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert cut.usage_metadata
    assert cut.usage_metadata.candidates_token_count == 3


async def test_other_prompts_get_a_short_acknowledgement(
    emu: tuple[Emulator, genai.Client],
) -> None:
    _, client = emu
    first = await generate(client, "Bonjour")
    assert first.text
    assert first.text.startswith("Bien reçu")
    as_json = await generate(client, "Bonjour", response_mime_type="application/json")
    assert json.loads(as_json.text or "") == {"texte": first.text}


async def test_count_tokens_matches_generate_and_costs_no_quota(
    session: aiohttp.ClientSession,
) -> None:
    config = EmulatorConfig(rpm=1, tpm=None, window_s=60)
    async with running(session, config) as (emulator, client):
        pdf, _ = make_index_pdf(pages=2, rows_per_page=2, seed=1)
        contents: list[Any] = [pdf_part(pdf), "Combien de pages ?"]
        for _ in range(3):
            counted = await client.aio.models.count_tokens(model=PRO, contents=contents)
        assert counted.total_tokens == 2 * 258 + 5
        answer = await client.aio.models.generate_content(model=PRO, contents=contents)
        assert answer.usage_metadata
        assert answer.usage_metadata.prompt_token_count == 2 * 258 + 5
        stats = emulator.stats()
        assert stats["count_tokens_calls"] == 3
        assert stats["models"][PRO]["requests"] == 1


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_other_api_versions_answer_alike(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client], version: str
) -> None:
    emulator, _ = emu
    client = sdk(emulator, session, version=version)
    answer = await generate(client, "Bonjour")
    assert answer.text
    assert answer.text.startswith("Bien reçu")
    counted = await client.aio.models.count_tokens(model=PRO, contents="abcdefgh")
    assert counted.total_tokens == 2


async def test_streaming_delivers_the_same_text_in_pieces(
    emu: tuple[Emulator, genai.Client],
) -> None:
    _, client = emu
    prompt = "Corrigez le texte.\n---\n" + " ".join(f"mot{i}" for i in range(60))
    whole = (await generate(client, prompt)).text
    chunks = [
        chunk
        async for chunk in await client.aio.models.generate_content_stream(
            model=PRO, contents=prompt
        )
    ]
    assert len(chunks) > 1
    assert "".join(chunk.text or "" for chunk in chunks) == whole
    assert chunks[-1].usage_metadata
    assert chunks[-1].usage_metadata.candidates_token_count


async def test_raw_snake_case_fields_and_error_shapes(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, _ = emu
    pdf, rows = make_index_pdf(pages=1, rows_per_page=2, seed=9)
    url = f"{emulator.base_url}/v1beta/models/{PRO}:generateContent"
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {
                        "inline_data": {
                            "mime_type": "application/pdf",
                            "data": base64.b64encode(pdf).decode(),
                        }
                    },
                    {"text": LINE_COUNT_PROMPT},
                ],
            }
        ],
        "generation_config": {"response_mime_type": "application/json"},
    }
    async with session.post(url, json=body, headers={"x-goog-api-key": "k"}) as reply:
        answer = await reply.json()
    text = answer["candidates"][0]["content"]["parts"][0]["text"]
    assert json.loads(text)["nombre_lignes"] == len(rows[0])

    async with session.post(url, json=body) as reply:
        assert reply.status == 403
        assert (await reply.json())["error"]["status"] == "PERMISSION_DENIED"
    async with session.post(url, data=b"{not json", headers={"x-goog-api-key": "k"}) as reply:
        assert reply.status == 400
        assert reply.content_type == "application/json"
    async with session.get(f"{emulator.base_url}/v9/nothing") as reply:
        assert reply.status == 404
        assert (await reply.json())["error"]["status"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "document",
    [make_corrupt_pdf(), make_encrypted_pdf(), make_empty_pdf()],
    ids=["corrupt", "encrypted", "empty"],
)
async def test_unreadable_documents_are_refused(
    emu: tuple[Emulator, genai.Client], document: bytes
) -> None:
    emulator, client = emu
    with pytest.raises(errors.ClientError) as refused:
        await generate(client, pdf_part(document), EXTRACTION_PROMPT)
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    uploaded = await client.aio.files.upload(
        file=io.BytesIO(document), config=types.UploadFileConfig(mime_type="application/pdf")
    )
    polled = await client.aio.files.get(name=uploaded.name or "")
    assert (await client.aio.files.get(name=polled.name or "")).state == types.FileState.FAILED
    assert emulator.stats()["models"][PRO]["invalid"] == 1


# The SDK hands aiohttp each 8 MB chunk as raw bytes, which aiohttp warns about.
@pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")
async def test_a_large_upload_goes_in_several_chunks(emu: tuple[Emulator, genai.Client]) -> None:
    emulator, client = emu
    data = b"ligne de texte\n" * (600 * 1024)  # ~9 MB: two 8 MB chunks
    uploaded = await client.aio.files.upload(
        file=io.BytesIO(data), config=types.UploadFileConfig(mime_type="text/plain")
    )
    assert uploaded.size_bytes == len(data)
    assert emulator.stats()["files"]["stored"] == 1


# -- faults ----------------------------------------------------------------------------


async def add_fault(http: aiohttp.ClientSession, emulator: Emulator, **rule: Any) -> None:
    async with http.post(f"{emulator.base_url}/_emulator/faults", json=rule) as reply:
        assert reply.status == 200, await reply.text()


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        ("server_error", errors.ServerError, 500),
        ("unavailable", errors.ServerError, 503),
        ("bare_429", errors.ClientError, 429),
    ],
)
async def test_error_faults_raise_the_sdk_error_once(
    session: aiohttp.ClientSession,
    emu: tuple[Emulator, genai.Client],
    kind: str,
    error: type[errors.APIError],
    code: int,
) -> None:
    emulator, client = emu
    await add_fault(session, emulator, kind=kind, count=1)
    with pytest.raises(error) as raised:
        await generate(client, "Bonjour")
    assert raised.value.code == code
    if kind == "bare_429":
        assert raised.value.status == "RESOURCE_EXHAUSTED"
        assert "details" not in raised.value.details["error"]
    assert (await generate(client, "Bonjour")).text
    stats = emulator.stats()["models"][PRO]
    assert stats["faults"] == {kind: 1}
    assert stats["requests"] == stats["admitted"] == 2


async def test_malformed_json_makes_the_sdk_raise(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, client = emu
    await add_fault(session, emulator, kind="malformed_json", count=2)
    with pytest.raises(json.JSONDecodeError):
        await generate(client, "Bonjour")
    with pytest.raises(errors.UnknownApiResponseError):
        async for _ in await client.aio.models.generate_content_stream(model=PRO, contents="x"):
            pass


async def test_missing_usage_and_safety_block(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, client = emu
    await add_fault(session, emulator, kind="no_usage", count=1)
    bare = await generate(client, "Bonjour")
    assert bare.text
    assert bare.usage_metadata is None
    await add_fault(session, emulator, kind="safety", count=1)
    blocked = await generate(client, "Bonjour")
    assert blocked.text is None
    assert blocked.candidates
    assert blocked.candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_a_hanging_call_outlives_the_client_timeout(
    session: aiohttp.ClientSession,
) -> None:
    async with running(session) as (emulator, _):
        emulator.add_fault(FaultRule(FaultKind.HANG, count=1, hang_s=30))
        client = sdk(emulator, session, timeout_ms=300)
        with pytest.raises(TimeoutError):
            await generate(client, "Bonjour")
        assert (await generate(client, "Bonjour")).text
        started = time.monotonic()
    # Stopping wakes the hanging handler instead of waiting out its 30 s.
    assert time.monotonic() - started < 5


async def test_uploaded_files_can_be_made_to_fail(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, client = emu
    await add_fault(session, emulator, kind="upload_failed", count=1)
    pdf, _ = make_acte_pdf(pages=1, seed=1)
    config = types.UploadFileConfig(mime_type="application/pdf")
    failed = await client.aio.files.upload(file=io.BytesIO(pdf), config=config)
    for _ in range(2):
        polled = await client.aio.files.get(name=failed.name or "")
    assert polled.state == types.FileState.FAILED
    part = types.Part.from_uri(file_uri=failed.uri or "", mime_type="application/pdf")
    with pytest.raises(errors.ClientError) as refused:
        await generate(client, part, "Transcrivez", model=FLASH)
    assert refused.value.status == "FAILED_PRECONDITION"
    fine = await client.aio.files.upload(file=io.BytesIO(pdf), config=config)
    await client.aio.files.get(name=fine.name or "")
    assert (await client.aio.files.get(name=fine.name or "")).state == types.FileState.ACTIVE
    assert emulator.stats()["files"]["failed"] == 1


async def test_drop_rows_is_undone_by_the_completeness_retry(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, client = emu
    await add_fault(session, emulator, kind="drop_rows")
    pdf, rows = make_index_pdf(pages=1, rows_per_page=5, seed=2)
    short = await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
    assert records(short.text or "") == rows[0][:-1]
    retry = f"{EXTRACTION_PROMPT} Lignes attendues : 5."
    full = await generate(client, pdf_part(pdf), retry)
    assert records(full.text or "") == rows[0]
    async with session.delete(f"{emulator.base_url}/_emulator/faults") as reply:
        assert (await reply.json()) == {"faults": []}
    assert records((await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)).text or "") == rows[0]


async def test_a_fraction_of_faults_is_seeded(session: aiohttp.ClientSession) -> None:
    outcomes = []
    for _ in range(2):
        config = EmulatorConfig(seed=5, faults=(FaultRule(FaultKind.UNAVAILABLE, fraction=0.5),))
        async with running(session, config) as (_, client):
            seen = []
            for _ in range(16):
                try:
                    await generate(client, "Bonjour")
                    seen.append(True)
                except errors.ServerError:
                    seen.append(False)
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert 0 < outcomes[0].count(False) < 16


# -- quota -----------------------------------------------------------------------------


async def test_the_third_call_in_a_tiny_window_waits_the_exact_delay(
    session: aiohttp.ClientSession,
) -> None:
    async with running(session, EmulatorConfig(rpm=2, tpm=None, window_s=1.0)) as (
        emulator,
        client,
    ):
        first_sent = time.monotonic()
        await generate(client, "un")
        await generate(client, "deux")
        with pytest.raises(errors.ClientError) as refused:
            await generate(client, "trois")
        error = refused.value
        assert (error.code, error.status) == (429, "RESOURCE_EXHAUSTED")
        found = quota_details(error)
        violation = found["QuotaFailure"]["violations"][0]
        assert "GenerateRequestsPerMinutePerProjectPerModel" in violation["quotaId"]
        assert violation["quotaDimensions"]["model"] == PRO
        delay = found["RetryInfo"]["retryDelay"]
        assert f"Please retry in {delay}." in (error.message or "")
        waited = seconds(delay)
        # Until the second call (sent just after the first) leaves the 1 s window.
        assert 1.0 - (time.monotonic() - first_sent) <= waited <= 1.0
        await asyncio.sleep(waited)
        assert (await generate(client, "quatre")).text
        stats = emulator.stats()["models"][PRO]
        assert (stats["admitted"], stats["rejected"], stats["http_429"]) == (3, 1, 1)


async def test_refused_calls_count_toward_the_request_limit(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    config = EmulatorConfig(rpm=2, tpm=None, window_s=1.0)
    async with running(session, config, clock=clock) as (emulator, client):
        await generate(client, "a")
        clock.now += 0.1
        await generate(client, "b")
        clock.now += 0.1
        with pytest.raises(errors.ClientError) as first:
            await generate(client, "c")
        assert quota_details(first.value)["RetryInfo"]["retryDelay"] == "0.900s"
        clock.now += 0.85  # "a" has left; "b" and the refused "c" still count
        with pytest.raises(errors.ClientError) as second:
            await generate(client, "d")
        assert quota_details(second.value)["RetryInfo"]["retryDelay"] == "0.150s"
        clock.now += 0.15
        assert (await generate(client, "e")).text
        stats = emulator.stats()["models"][PRO]
        assert (stats["peak_requests"], stats["peak_counted_requests"]) == (2, 3)


@pytest.mark.parametrize(
    ("tpm_counts", "quota_id"),
    [
        ("input", "GenerateContentInputTokensPerModelPerMinute"),
        ("total", "GenerateContentTotalTokensPerModelPerMinute"),
    ],
)
async def test_token_quota_names_what_it_counts(
    session: aiohttp.ClientSession, tpm_counts: str, quota_id: str
) -> None:
    clock = FakeClock()
    config = EmulatorConfig(rpm=None, tpm=500, window_s=60, tpm_counts=tpm_counts)  # type: ignore[arg-type]
    async with running(session, config, clock=clock) as (emulator, client):
        pdf, _ = make_index_pdf(pages=1, rows_per_page=1, seed=1)
        first = await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
        usage = first.usage_metadata
        assert usage is not None
        assert usage.total_token_count is not None
        clock.now += 10
        with pytest.raises(errors.ClientError) as refused:
            await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
        violation = quota_details(refused.value)["QuotaFailure"]["violations"][0]
        assert violation["quotaId"] == quota_id
        assert violation["quotaValue"] == "500"
        assert quota_details(refused.value)["RetryInfo"]["retryDelay"] == "50s"
        counted = usage.prompt_token_count if tpm_counts == "input" else usage.total_token_count
        assert emulator.stats()["models"][PRO]["peak_tokens"] == counted


async def test_peaks_report_the_busiest_window(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with running(session, EmulatorConfig(window_s=10.0), clock=clock) as (emulator, client):
        for step in (0, 1, 2, 15, 30, 31):
            clock.now = 1000.0 + step
            await generate(client, "abcd" * 25)  # 25 input tokens each
        stats = emulator.stats()["models"][PRO]
        assert (stats["admitted"], stats["peak_requests"], stats["peak_tokens"]) == (6, 3, 75)
        assert stats["input_tokens"] == 150


async def test_quota_can_be_changed_and_everything_reset_over_http(
    session: aiohttp.ClientSession, emu: tuple[Emulator, genai.Client]
) -> None:
    emulator, client = emu
    await generate(client, "Bonjour")
    async with session.post(
        f"{emulator.base_url}/_emulator/quota", json={"model": PRO, "rpm": 1}
    ) as reply:
        limits = (await reply.json())["models"][PRO]["limits"]
    assert (limits["rpm"], limits["tpm"]) == (1, EmulatorConfig().tpm)
    with pytest.raises(errors.ClientError) as refused:
        await generate(client, "Bonjour")
    assert refused.value.code == 429
    async with session.get(f"{emulator.base_url}/_emulator/stats") as reply:
        assert await reply.json() == emulator.stats()
    async with session.post(f"{emulator.base_url}/_emulator/reset") as reply:
        assert (await reply.json())["models"] == {}
    assert (await generate(client, "Bonjour")).text
    assert emulator.stats()["models"][PRO]["limits"]["rpm"] == EmulatorConfig().rpm


async def test_per_model_quotas_and_latency(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(model_quotas={FLASH: (1, None)}, latency_ms=150)
    async with running(session, config) as (emulator, client):
        started = time.monotonic()
        await generate(client, "Bonjour", model=FLASH)
        assert time.monotonic() - started >= 0.15
        with pytest.raises(errors.ClientError):
            await generate(client, "Bonjour", model=FLASH)
        await generate(client, "Bonjour", model=PRO)
        assert emulator.stats()["models"][FLASH]["limits"]["rpm"] == 1


# -- output sizes ----------------------------------------------------------------------

# What a benchmark does in its own process: predict a request's usage from the prompt alone.
ORACLE = """
import dataclasses, json, sys
from runtime.emulator import Document, EmulatorConfig, Prompt, make_index_pdf
pdf, _ = make_index_pdf(pages=1, rows_per_page=3, seed=4)
config = EmulatorConfig(seed=11, output_scale=1.5, output_cv=0.8, thinking_ratio=0.5)
prompt = Prompt(texts=(sys.argv[1],), inline=(Document("application/pdf", pdf),))
author = config.author()
print(json.dumps([dataclasses.asdict(author.answer(prompt, occurrence=n).usage) for n in range(4)]))
"""


def index_request(seed: int = 4) -> tuple[bytes, Prompt]:
    """An index page and the `Prompt` the emulator reads from ``(pdf_part, EXTRACTION_PROMPT)``."""
    pdf, _ = make_index_pdf(pages=1, rows_per_page=3, seed=seed)
    return pdf, Prompt(texts=(EXTRACTION_PROMPT,), inline=(Document("application/pdf", pdf),))


def usage_of(answer: types.GenerateContentResponse) -> types.GenerateContentResponseUsageMetadata:
    assert answer.usage_metadata is not None
    return answer.usage_metadata


async def test_output_sizes_are_scaled_exactly_without_variation(
    session: aiohttp.ClientSession,
) -> None:
    pdf, _ = index_request()
    async with running(session, EmulatorConfig(seed=7)) as (_, client):
        plain = await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
    natural = usage_of(plain).candidates_token_count
    assert natural
    config = EmulatorConfig(seed=7, output_scale=3.0, thinking_ratio=0.5)
    async with running(session, config) as (emulator, client):
        scaled = await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
        chunks = [
            chunk
            async for chunk in await client.aio.models.generate_content_stream(
                model=PRO, contents=[pdf_part(pdf), EXTRACTION_PROMPT]
            )
        ]
        capped = await generate(
            client, pdf_part(pdf), EXTRACTION_PROMPT, max_output_tokens=natural + 1
        )
        stats = emulator.stats()["models"][PRO]
    assert scaled.text == plain.text
    usage = usage_of(scaled)
    thoughts = math.ceil(3 * natural * 0.5)
    assert (usage.candidates_token_count, usage.thoughts_token_count) == (3 * natural, thoughts)
    assert usage.total_token_count == usage_of(plain).prompt_token_count + 3 * natural + thoughts
    assert chunks[-1].usage_metadata == usage
    assert capped.text == plain.text
    assert capped.candidates
    assert capped.candidates[0].finish_reason == types.FinishReason.STOP
    assert usage_of(capped).candidates_token_count == natural + 1
    assert stats["output_tokens"] == 2 * 3 * natural + natural + 1
    assert stats["thoughts_tokens"] == 2 * thoughts + math.ceil((natural + 1) * 0.5)


async def test_uncertain_output_sizes_replay_by_seed(session: aiohttp.ClientSession) -> None:
    async def run(seed: int) -> list[int | None]:
        config = EmulatorConfig(seed=seed, output_cv=1.0)
        async with running(session, config) as (emulator, client):
            counts = [
                usage_of(await generate(client, "Bonjour")).candidates_token_count for _ in range(4)
            ]
            emulator.reset()  # forgets the occurrences: the run starts over
            assert usage_of(await generate(client, "Bonjour")).candidates_token_count == counts[0]
        return counts

    first = await run(5)
    assert len(set(first)) > 1  # a repeated request gets a new draw
    assert await run(5) == first
    assert await run(6) != first


async def test_a_total_token_quota_counts_the_scaled_output(
    session: aiohttp.ClientSession,
) -> None:
    pdf, prompt = index_request()
    unscaled = EmulatorConfig(seed=7).author().answer(prompt).usage.total_tokens
    clock = FakeClock()
    config = EmulatorConfig(
        seed=7, rpm=None, tpm=2 * unscaled, tpm_counts="total", output_scale=3.0
    )
    async with running(session, config, clock=clock) as (emulator, client):
        usage = usage_of(await generate(client, pdf_part(pdf), EXTRACTION_PROMPT))
        assert usage.total_token_count
        assert usage.total_token_count > unscaled
        assert emulator.stats()["models"][PRO]["window_tokens"] == usage.total_token_count
        clock.now += 1
        # Two unscaled calls would fit; the scaled first one leaves no room for a second.
        with pytest.raises(errors.ClientError) as refused:
            await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
        violation = quota_details(refused.value)["QuotaFailure"]["violations"][0]
        assert violation["quotaId"] == "GenerateContentTotalTokensPerModelPerMinute"


async def test_a_separate_process_predicts_the_usage_of_each_answer(
    session: aiohttp.ClientSession,
) -> None:
    oracle = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORACLE, EXTRACTION_PROMPT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await oracle.communicate()
    assert oracle.returncode == 0
    predicted = json.loads(out)
    assert len({p["output_tokens"] for p in predicted}) > 1
    pdf, _ = index_request()
    clock = FakeClock()
    config = EmulatorConfig(
        seed=11, output_scale=1.5, output_cv=0.8, thinking_ratio=0.5, rpm=1, window_s=1.0
    )
    async with running(session, config, clock=clock) as (emulator, client):

        async def call() -> types.GenerateContentResponseUsageMetadata:
            clock.now += 1
            return usage_of(await generate(client, pdf_part(pdf), EXTRACTION_PROMPT))

        served = [await call()]
        with pytest.raises(errors.ClientError):  # refused by the quota: not an answer
            await generate(client, pdf_part(pdf), EXTRACTION_PROMPT)
        served.append(await call())
        emulator.add_fault(FaultRule(FaultKind.SERVER_ERROR, count=1))
        with pytest.raises(errors.ServerError):  # charged like a real answer: it counts
            await call()
        served.append(await call())
        stats = emulator.stats()["models"][PRO]
    for usage, expected in zip(served, [predicted[0], predicted[1], predicted[3]], strict=True):
        assert usage.prompt_token_count == expected["text_tokens"] + sum(
            expected["media_tokens"].values()
        )
        assert usage.candidates_token_count == expected["output_tokens"]
        assert usage.thoughts_token_count == expected["thoughts_tokens"]
    assert stats["output_tokens"] == sum(p["output_tokens"] for p in predicted)


def test_the_command_line_serves_until_terminated() -> None:
    script = (
        "import argparse, sys\n"
        "from runtime.emulator.cli import configure_parser, run\n"
        "parser = argparse.ArgumentParser()\n"
        "configure_parser(parser)\n"
        "sys.exit(run(parser.parse_args()))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--port", "0", "--rpm", "5", "--model-quota", "m=1,none"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = re.search(r"http://\S+", line)
        assert url, line
        with urllib.request.urlopen(f"{url.group(0)}/_emulator/stats", timeout=5) as reply:
            stats = json.load(reply)
        assert stats["models"]["m"]["limits"]["rpm"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
