"""The OCR pipelines against the emulated Gemini API, through the real SDK and the limiter."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import pytest
from google.genai import types

from runtime.emulator import (
    Emulator,
    EmulatorConfig,
    FaultRule,
    IndexRow,
    make_acte_pdf,
    make_corrupt_pdf,
    make_empty_pdf,
    make_encrypted_pdf,
    make_index_pdf,
)
from runtime.errors import PermanentError, TransientError
from runtime.limiter import Budget, create_limiter
from runtime.pipelines import PipelineConfig, PipelineResult, run_acte, run_index
from runtime.pipelines.acte import paragraph_chunks
from runtime.pipelines.estimates import MemoryEstimates
from runtime.pipelines.gemini import (
    Call,
    Completion,
    GeminiBlocked,
    GeminiClient,
    GeminiUnavailable,
    RetryPolicy,
)

BIG = Budget(rpm=100_000, tpm=100_000_000, window_s=60.0)
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)
CONFIG = PipelineConfig()
INDEX_MODEL = CONFIG.model_index
ACTE_MODEL = CONFIG.model_acte
BOOST_MODEL = CONFIG.model_boost
MARKERS = {"[?]", "[ILLISIBLE]"}


@dataclass(frozen=True)
class Row:
    """The parts of a queue row the pipelines read."""

    document_source: str
    document_number: str | None = None
    supabase_path: str | None = None


INDEX_ROW = Row("index", "2 345 678", "index/2345678.pdf")
ACTE_ROW = Row("acte", "12 345 678", "actes/12345678.pdf")


class RecordingClient(GeminiClient):
    """The real client, noting the calls it makes and how many run at once."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.calls: list[Call] = []
        self.upload_states: list[str] = []
        self.calls_in_flight = 0
        self.peak_calls = 0
        self.pages_in_flight: Counter[bytes] = Counter()
        self.peak_pages = 0

    async def generate(self, call: Call) -> Completion:
        self.calls.append(call)
        self.calls_in_flight += 1
        self.peak_calls = max(self.peak_calls, self.calls_in_flight)
        if call.pdf is not None:
            self.pages_in_flight[call.pdf] += 1
            self.peak_pages = max(self.peak_pages, len(self.pages_in_flight))
        try:
            return await super().generate(call)
        finally:
            self.calls_in_flight -= 1
            if call.pdf is not None:
                self.pages_in_flight[call.pdf] -= 1
                if not self.pages_in_flight[call.pdf]:
                    del self.pages_in_flight[call.pdf]

    async def upload_pdf(self, data: bytes, *, display_name: str) -> types.File:
        uploaded = await super().upload_pdf(data, display_name=display_name)
        self.upload_states.append(uploaded.state.name if uploaded.state else "")
        return uploaded

    def kinds(self) -> Counter[str]:
        return Counter(call.kind for call in self.calls)


@asynccontextmanager
async def wired(
    config: EmulatorConfig | None = None,
    *,
    client_class: type[RecordingClient] = RecordingClient,
    retry: RetryPolicy = FAST_RETRY,
) -> AsyncIterator[tuple[Emulator, RecordingClient]]:
    """An emulator, an in-process limiter and a client pointed at both."""
    async with Emulator(config or EmulatorConfig(seed=7)) as emulator:
        limiter = await create_limiter(None, BIG)
        client = client_class(
            api_key="test-key",
            base_url=emulator.base_url,
            limiter=limiter,
            estimates=MemoryEstimates(),
            retry=retry,
            timeout_s=30.0,
        )
        try:
            yield emulator, client
        finally:
            await client.aclose()
            await limiter.aclose()


def requests_to(emulator: Emulator, model: str) -> int:
    models: dict[str, dict[str, Any]] = emulator.stats()["models"]
    return int(models.get(model, {}).get("requests", 0))


def key_fields(record: dict[str, Any]) -> tuple[str, str, str, str]:
    return (
        record["numero_publication"],
        record["date"],
        record["nature"],
        record["parties"],
    )


def row_fields(row: IndexRow) -> tuple[str, str, str, str]:
    return (row.numero_publication, row.date, row.nature, row.parties)


def assert_pages_match(document: dict[str, Any], expected: list[list[IndexRow]]) -> None:
    assert [page["page"] for page in document["pages"]] == list(range(1, len(expected) + 1))
    for page, rows in zip(document["pages"], expected, strict=True):
        assert [key_fields(r) for r in page["records"]] == [row_fields(r) for r in rows], (
            f"page {page['page']}"
        )


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(round(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not the case after {timeout_s:g} s")


# --- Index -------------------------------------------------------------------------------

ROWS_PER_PAGE = [3, 0, 5, 1, 7, 2, 4, 6, 1, 3]


async def test_a_ten_page_index_becomes_the_rows_drawn_on_each_page() -> None:
    pdf, expected = make_index_pdf(10, ROWS_PER_PAGE, seed=11)
    async with wired() as (emulator, client):
        result = await run_index(INDEX_ROW, pdf, client, CONFIG)
        index_requests = requests_to(emulator, INDEX_MODEL)

    document = json.loads(result.file_content)
    assert_pages_match(document, expected)
    for page, rows in zip(document["pages"], expected, strict=True):
        assert page["line_count"] == len(rows)
        assert page["gap"] == 0
        assert page["reread"] is False
        for record, row in zip(page["records"], rows, strict=True):
            # The registry's dash for an empty field is read as empty.
            assert record["radiation"] == ("" if row.radiation == "—" else row.radiation)
            assert record["remarques"] == ("" if row.remarques == "—" else row.remarques)
            assert record["confiance"] == row.confiance
    total = sum(ROWS_PER_PAGE)
    assert document["page_count"] == 10
    assert document["total_records"] == total
    assert document["total_lines"] == total
    assert document["gaps"] == []
    assert document["models"] == [INDEX_MODEL]
    assert document["document_number"] == INDEX_ROW.document_number

    text = result.boosted_file_content
    assert text.startswith(f"Index {INDEX_ROW.document_number}\n10 pages, {total} inscriptions")
    assert "{" not in text  # readable text, not JSON
    for rows in expected:
        for row in rows:
            assert row.numero_publication in text
    assert text.count("--- Page ") == 10

    assert result.profile.calls == 20  # a line count and an extraction per page
    assert result.profile.pages == 10
    assert result.profile.document_source == "index"
    assert result.profile.retries == 0
    assert result.profile.input_tokens >= 20 * 258  # one PDF page per call
    assert result.profile.output_tokens > 0
    assert index_requests == 20
    assert client.kinds() == {"line_count": 10, "index_extract": 10}


async def test_a_page_short_of_rows_is_read_again_with_the_expected_count() -> None:
    rows_per_page = [3, 1, 0, 2]
    pdf, expected = make_index_pdf(4, rows_per_page, seed=12)
    # Every first extraction leaves out the page's last row; the re-read states the count.
    config = EmulatorConfig(seed=3, faults=(FaultRule("drop_rows"),))
    async with wired(config) as (emulator, client):
        result = await run_index(INDEX_ROW, pdf, client, CONFIG)
        dropped = emulator.stats()["faults_fired"].get("drop_rows", 0)

    document = json.loads(result.file_content)
    assert_pages_match(document, expected)
    assert [page["reread"] for page in document["pages"]] == [True, True, False, True]
    assert document["gaps"] == []
    assert document["total_records"] == document["total_lines"] == sum(rows_per_page)
    assert dropped == 4  # the fault hit every first extraction, the empty page's too
    recounts = [call for call in client.calls if call.kind == "index_recount"]
    assert len(recounts) == 3
    for call in recounts:
        assert "attendu" in call.prompt
    found_expected = sorted(
        (int(m[1]), int(m[2]))
        for call in recounts
        if (m := re.search(r"trouvé (\d+) inscriptions alors que (\d+) lignes", call.prompt))
    )
    assert found_expected == [(0, 1), (1, 2), (2, 3)]
    assert result.profile.calls == 8 + 3


class ScriptedClient:
    """A stand-in for GeminiClient whose answers are written by the test, per call kind."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[Call] = []

    async def pace(self) -> None:
        return None

    async def generate(self, call: Call) -> Completion:
        self.calls.append(call)
        queue = self.answers[call.kind]
        text = queue.pop(0) if len(queue) > 1 else queue[0]
        return Completion(
            text=text, finish_reason="STOP", input_tokens=300, output_tokens=50, total_tokens=350
        )


def records_json(rows: list[IndexRow]) -> str:
    return json.dumps([row.to_record() for row in rows], ensure_ascii=False)


async def run_scripted(answers: dict[str, list[str]]) -> tuple[dict[str, Any], PipelineResult]:
    pdf, _ = make_index_pdf(1, 3, seed=13)
    client = ScriptedClient(answers)
    result = await run_index(INDEX_ROW, pdf, cast(GeminiClient, client), CONFIG)
    return json.loads(result.file_content), result


async def test_a_gap_that_the_re_read_does_not_close_is_recorded() -> None:
    # The emulator's drop_rows fault spares the re-read (its prompt states the count), so a
    # gap that stays is scripted here.
    _, pages = make_index_pdf(1, 3, seed=13)
    rows = pages[0]
    document, result = await run_scripted(
        {
            "line_count": ['{"nombre_lignes": 3, "confiance": 0.9}'],
            "index_extract": [records_json(rows[:1])],
            "index_recount": [records_json(rows[:2])],
        }
    )
    (page,) = document["pages"]
    # The better of the two readings is kept, and what is still missing is said.
    assert [r["numero_publication"] for r in page["records"]] == [
        r.numero_publication for r in rows[:2]
    ]
    assert page["reread"] is True
    assert page["gap"] == 1
    assert document["gaps"] == [{"page": 1, "missing": 1}]
    assert document["total_lines"] == 3
    assert document["total_records"] == 2
    assert "[1 ligne(s) comptée(s) sans inscription lue]" in result.boosted_file_content
    assert result.profile.calls == 0  # the stand-in does not go through the call log


@pytest.mark.parametrize(
    "recount",
    [
        pytest.param("[]", id="re-read-finds-fewer"),
        pytest.param("Je ne peux pas lire cette page.", id="re-read-unreadable"),
    ],
)
async def test_a_worse_re_read_keeps_the_first_reading(recount: str) -> None:
    _, pages = make_index_pdf(1, 3, seed=13)
    rows = pages[0]
    document, _ = await run_scripted(
        {
            "line_count": ['```json\n{"nombre_lignes": 3, "confiance": 0.9}\n```'],
            "index_extract": ["Voici le tableau :\n" + records_json(rows[:2])],
            "index_recount": [recount],
        }
    )
    (page,) = document["pages"]
    assert [key_fields(r) for r in page["records"]] == [row_fields(r) for r in rows[:2]]
    assert document["gaps"] == [{"page": 1, "missing": 1}]


@pytest.mark.parametrize(
    "line_count",
    ["beaucoup de lignes", '{"nombre_lignes": NaN}', '{"nombre_lignes": Infinity}'],
)
async def test_an_answer_never_readable_fails_the_page_by_name(line_count: str) -> None:
    with pytest.raises(PermanentError, match=r"page 1: the model's line_count answer"):
        await run_scripted({"line_count": [line_count], "index_extract": ["[]"]})


@pytest.mark.parametrize("pages_in_flight", [1, 3])
async def test_pages_run_concurrently_within_the_documents_bound(pages_in_flight: int) -> None:
    pdf, expected = make_index_pdf(8, 2, seed=14)
    config = PipelineConfig(pages_in_flight=pages_in_flight)
    async with wired(EmulatorConfig(seed=4, latency_ms=60.0)) as (_emulator, client):
        result = await run_index(INDEX_ROW, pdf, client, config)
    assert_pages_match(json.loads(result.file_content), expected)
    assert client.peak_pages == pages_in_flight
    # A page's line count and extraction run side by side.
    assert client.peak_calls == 2 * pages_in_flight


# --- Acte --------------------------------------------------------------------------------


def assert_transcribes(raw: str, source: str) -> None:
    """Every word of the source is in the raw text, or a doubt / illegibility marker."""
    pairs = list(zip(raw.split(), source.split(), strict=True))
    assert all(got == want or got in MARKERS for got, want in pairs)
    assert sum(got == want for got, want in pairs) > 0.9 * len(pairs)


async def test_an_acte_is_uploaded_read_boosted_and_its_file_deleted() -> None:
    pdf, source = make_acte_pdf(3, seed=21)
    config = EmulatorConfig(seed=5, processing_polls=2)
    async with wired(config) as (emulator, client):
        result = await run_acte(ACTE_ROW, pdf, client, CONFIG)
        stats = emulator.stats()

    assert client.upload_states == ["PROCESSING"]  # then polled until ACTIVE
    assert_transcribes(result.file_content, source)
    assert "[?]" in result.file_content
    assert "[?]" not in result.boosted_file_content
    raw_words = [word for word in result.file_content.split() if word != "[?]"]
    assert result.boosted_file_content.split() == raw_words
    assert stats["files"] == {"uploaded": 1, "deleted": 1, "stored": 0, "failed": 0}
    assert stats["models"][ACTE_MODEL]["requests"] == 1
    assert stats["models"][BOOST_MODEL]["requests"] == 1
    assert client.kinds() == {"acte_extract": 1, "boost": 1}
    extract = client.calls[0]
    assert extract.file is not None
    assert extract.file.state is not None
    assert extract.file.state.name == "ACTIVE"
    assert result.profile.calls == 2
    assert result.profile.pages == 3
    assert result.profile.document_source == "acte"


@pytest.mark.parametrize(
    ("chunk_chars", "chunks"),
    [
        pytest.param(8_000, 3, id="between-pages"),
        pytest.param(2_500, 12, id="within-pages"),
    ],
)
async def test_a_long_acte_is_boosted_in_chunks_and_joined(chunk_chars: int, chunks: int) -> None:
    pdf, source = make_acte_pdf(6, seed=1)
    config = PipelineConfig(boost_chunk_chars=chunk_chars)
    async with wired(EmulatorConfig(seed=6, processing_polls=0)) as (emulator, client):
        result = await run_acte(ACTE_ROW, pdf, client, config)
        boost_requests = requests_to(emulator, BOOST_MODEL)
        files = emulator.stats()["files"]

    assert_transcribes(result.file_content, source)
    expected_chunks = paragraph_chunks(result.file_content, chunk_chars)
    assert len(expected_chunks) == chunks
    assert all(len(chunk) <= chunk_chars for chunk in expected_chunks)
    assert boost_requests == chunks
    assert result.profile.calls == 1 + chunks
    boosts = [call for call in client.calls if call.kind == "boost"]
    assert [f"(Partie {n} de {chunks}.)" in call.prompt for n, call in enumerate(boosts, 1)] == [
        True
    ] * chunks
    # Joined in order, nothing lost but the doubt markers.
    raw_words = [word for word in result.file_content.split() if word != "[?]"]
    assert result.boosted_file_content.split() == raw_words
    assert "[?]" not in result.boosted_file_content
    if chunk_chars == 8_000:
        # Cut between pages only: the six pages stay six paragraphs.
        assert len(result.boosted_file_content.split("\n\n")) == 6
    assert files["stored"] == 0


async def test_a_transcription_cut_at_the_output_limit_fails_and_deletes_its_file() -> None:
    pdf, _ = make_acte_pdf(3, seed=21)
    config = PipelineConfig(max_output_tokens=50)
    async with wired(EmulatorConfig(seed=5, processing_polls=0)) as (emulator, client):
        with pytest.raises(PermanentError, match="cut at the model's output limit"):
            await run_acte(ACTE_ROW, pdf, client, config)
        files = emulator.stats()["files"]
    assert files["stored"] == 0


# --- Bad inputs and failed answers -------------------------------------------------------


def too_many_pages() -> bytes:
    return make_index_pdf(4, 1, seed=15)[0]


BAD_INPUTS = [
    pytest.param(lambda: b"<html>Not found</html>", r"not a PDF", id="not-a-pdf"),
    pytest.param(make_corrupt_pdf, r"PDF is damaged and cannot be read", id="corrupt"),
    pytest.param(make_encrypted_pdf, r"PDF is encrypted with a password", id="encrypted"),
    pytest.param(make_empty_pdf, r"PDF has no pages", id="zero-pages"),
]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        *BAD_INPUTS,
        pytest.param(
            too_many_pages, r"PDF has 4 pages, more than the limit of 3", id="too-many-pages"
        ),
    ],
)
async def test_an_index_that_is_no_readable_pdf_fails_clearly(
    make: Callable[[], bytes], message: str
) -> None:
    async with wired() as (emulator, client):
        with pytest.raises(PermanentError, match=message):
            await run_index(INDEX_ROW, make(), client, PipelineConfig(index_max_pages=3))
        assert emulator.stats()["models"] == {}  # nothing was sent


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS)
async def test_an_acte_that_is_no_readable_pdf_fails_clearly(
    make: Callable[[], bytes], message: str
) -> None:
    async with wired() as (emulator, client):
        with pytest.raises(PermanentError, match=message):
            await run_acte(ACTE_ROW, make(), client, CONFIG)
        assert emulator.stats()["files"]["uploaded"] == 0


async def test_a_damaged_page_behind_a_readable_page_table_fails_clearly() -> None:
    pdf = make_index_pdf(2, 2, seed=16)[0]
    # The page table still reads, but the first page's dictionary is cut short.
    intact = b"/Contents 9 0 R /MediaBox [ 0 0 792 612 ]"
    assert pdf.count(intact) == 1
    broken = pdf.replace(intact, intact[:-1])
    async with wired() as (emulator, client):
        with pytest.raises(PermanentError, match=r"PDF is damaged and cannot be read \(page 1"):
            await run_index(INDEX_ROW, broken, client, CONFIG)
        assert emulator.stats()["models"] == {}


async def test_an_upload_that_ends_failed_fails_the_acte_and_is_deleted() -> None:
    pdf, _ = make_acte_pdf(1, seed=22)
    config = EmulatorConfig(faults=(FaultRule("upload_failed", count=1),))
    async with wired(config) as (emulator, client):
        with pytest.raises(PermanentError, match=r"Gemini could not process the uploaded PDF"):
            await run_acte(ACTE_ROW, pdf, client, CONFIG)
        stats = emulator.stats()
    assert stats["files"] == {"uploaded": 1, "deleted": 1, "stored": 0, "failed": 1}
    assert stats["models"] == {}


async def test_a_blocked_index_answer_fails_the_page_clearly() -> None:
    pdf, _ = make_index_pdf(3, [2, 2, 2], seed=17)
    config = EmulatorConfig(faults=(FaultRule("safety"),))
    async with wired(config) as (_emulator, client):
        with pytest.raises(GeminiBlocked) as caught:
            await run_index(INDEX_ROW, pdf, client, CONFIG)
    assert isinstance(caught.value, PermanentError)
    assert re.fullmatch(
        r"page [1-3]: Gemini blocked the (line_count|index_extract) answer \(SAFETY\)",
        str(caught.value),
    )


async def test_a_blocked_acte_extraction_fails_clearly_and_deletes_the_file() -> None:
    pdf, _ = make_acte_pdf(1, seed=23)
    config = EmulatorConfig(processing_polls=0, faults=(FaultRule("safety", model=ACTE_MODEL),))
    async with wired(config) as (emulator, client):
        with pytest.raises(PermanentError, match=r"Gemini blocked the acte_extract answer"):
            await run_acte(ACTE_ROW, pdf, client, CONFIG)
        files = emulator.stats()["files"]
    assert files["stored"] == 0
    assert files["deleted"] == 1


async def test_a_malformed_answer_fails_after_the_clients_retries() -> None:
    """A reply whose body is cut off is the transport failing, not the model refusing the
    page: the client retries it, then gives up with GeminiUnavailable, a TransientError, so
    the job is tried again later rather than failed for good. The message names the page,
    the call and the problem."""
    pdf, _ = make_index_pdf(1, 2, seed=18)
    config = EmulatorConfig(faults=(FaultRule("malformed_json", model=INDEX_MODEL),))
    async with wired(config) as (emulator, client):
        with pytest.raises(GeminiUnavailable) as caught:
            await run_index(INDEX_ROW, pdf, client, CONFIG)
        requests = requests_to(emulator, INDEX_MODEL)
    assert isinstance(caught.value, TransientError)
    assert re.fullmatch(
        r"page 1: Gemini (line_count|index_extract) call on gemini-2\.5-pro failed after "
        r"3 attempts: unreadable answer: .+",
        str(caught.value),
        flags=re.DOTALL,
    )
    assert 3 <= requests <= 6  # FAST_RETRY's three attempts, for one or both calls


# --- Cancellation ------------------------------------------------------------------------


async def test_cancelling_an_acte_while_it_is_read_still_deletes_its_file() -> None:
    pdf, _ = make_acte_pdf(2, seed=24)
    config = EmulatorConfig(processing_polls=0, latency_ms=20_000.0)
    async with wired(config) as (emulator, client):
        job = asyncio.create_task(run_acte(ACTE_ROW, pdf, client, CONFIG))
        await wait_until(lambda: requests_to(emulator, ACTE_MODEL) == 1)
        assert emulator.stats()["files"]["stored"] == 1
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        files = emulator.stats()["files"]
    assert files == {"uploaded": 1, "deleted": 1, "stored": 0, "failed": 0}


class SlowUploadAnswer(RecordingClient):
    """The file is stored, but the answer naming it is slow to come back."""

    ANSWER_DELAY_S = 0.3

    async def upload_pdf(self, data: bytes, *, display_name: str) -> types.File:
        uploaded = await super().upload_pdf(data, display_name=display_name)
        await asyncio.sleep(self.ANSWER_DELAY_S)
        return uploaded


async def test_cancelling_an_acte_during_its_upload_still_deletes_the_file() -> None:
    pdf, _ = make_acte_pdf(1, seed=25)
    async with wired(client_class=SlowUploadAnswer) as (emulator, client):
        job = asyncio.create_task(run_acte(ACTE_ROW, pdf, client, CONFIG))
        await wait_until(lambda: emulator.stats()["files"]["uploaded"] == 1)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        files = emulator.stats()["files"]
        generated = emulator.stats()["models"]
    assert files == {"uploaded": 1, "deleted": 1, "stored": 0, "failed": 0}
    assert generated == {}
