"""The emulator's answers, sample documents and fault rules, without a server."""

from __future__ import annotations

import json
import random

import pytest

from runtime.emulator.content import (
    AnswerKind,
    Author,
    Document,
    PdfCache,
    Prompt,
    UnreadableDocument,
    boost_text,
    mark_doubtful_words,
)
from runtime.emulator.faults import FaultKind, FaultPlan, FaultRule
from runtime.emulator.samples import (
    format_row,
    make_acte_pdf,
    make_corrupt_pdf,
    make_empty_pdf,
    make_encrypted_pdf,
    make_imageonly_pdf,
    make_index_pdf,
    parse_row,
)


@pytest.fixture(scope="module")
def index_pdf() -> Document:
    pdf, _ = make_index_pdf(pages=1, rows_per_page=4, seed=3)
    return Document("application/pdf", pdf)


@pytest.mark.parametrize(
    ("text", "inline", "files", "kind"),
    [
        ("Transcrivez le nombre de lignes et les inscriptions", True, True, AnswerKind.ACTE),
        ("Donnez le NOMBRE DE LIGNES des inscriptions", True, False, AnswerKind.LINE_COUNT),
        ("Extrayez les Inscriptions", True, False, AnswerKind.INDEX),
        ("Extrayez les inscriptions", False, False, AnswerKind.ACKNOWLEDGEMENT),
        ("Corrigez ce texte\n---\nabc", False, False, AnswerKind.BOOST),
        ("Bonjour", True, False, AnswerKind.ACKNOWLEDGEMENT),
    ],
)
def test_the_kind_of_answer_follows_the_documented_order(
    index_pdf: Document, text: str, inline: bool, files: bool, kind: AnswerKind
) -> None:
    prompt = Prompt(
        texts=(text,),
        inline=(index_pdf,) if inline else (),
        files=(index_pdf,) if files else (),
    )
    assert Author(seed=0).classify(prompt) is kind


def test_keywords_in_the_system_instruction_count(index_pdf: Document) -> None:
    prompt = Prompt(
        texts=("Page 3",), system_texts=("Extrayez les inscriptions.",), inline=(index_pdf,)
    )
    assert Author(seed=0).classify(prompt) is AnswerKind.INDEX


def test_the_fence_depends_on_the_seed_and_never_wraps_json_mode() -> None:
    fenced = set()
    for seed in range(12):
        pdf, rows = make_index_pdf(pages=1, rows_per_page=2, seed=seed)
        prompt = Prompt(texts=("inscriptions",), inline=(Document("application/pdf", pdf),))
        text = Author(seed=seed).answer(prompt).text
        fenced.add(text.startswith("```json\n"))
        strict = Author(seed=seed).answer(
            Prompt(texts=prompt.texts, inline=prompt.inline, response_mime_type="application/json")
        )
        assert json.loads(strict.text) == [row.to_record() for row in rows[0]]
    assert fenced == {True, False}


def test_about_three_percent_of_words_are_doubtful() -> None:
    text = " ".join(f"mot{i}" for i in range(20_000))
    marked = mark_doubtful_words(text, random.Random(1)).split()
    doubtful, illegible = marked.count("[?]"), marked.count("[ILLISIBLE]")
    assert 0.025 < doubtful / len(marked) < 0.035
    assert 0.003 < illegible / len(marked) < 0.007


def test_boost_without_a_separator_cleans_the_whole_text() -> None:
    assert boost_text(("Corrigez  ceci [?]\n\n\n la  suite",)) == "Corrigez ceci\n\nla suite"
    assert boost_text(("a\n --- \nb [?] c", "d")) == "b c d"


def test_max_output_tokens_truncates_any_answer() -> None:
    answer = Author(seed=0).answer(Prompt(texts=("Bonjour",), max_output_tokens=2))
    assert answer.finish_reason == "MAX_TOKENS"
    assert len(answer.text) == 8
    assert answer.usage.output_tokens == 2


def test_thinking_tokens_are_reported_when_asked() -> None:
    answer = Author(seed=0, thinking_ratio=0.5).answer(Prompt(texts=("Bonjour",)))
    assert answer.usage.thoughts_tokens == -(-answer.usage.output_tokens // 2)
    assert answer.usage.total_tokens == (
        answer.usage.prompt_tokens + answer.usage.output_tokens + answer.usage.thoughts_tokens
    )


def test_a_page_without_text_counts_no_rows_and_reads_illegible() -> None:
    scan = Document("application/pdf", make_imageonly_pdf(pages=2))
    author = Author(seed=0)
    count = author.answer(Prompt(texts=("nombre de lignes",), inline=(scan,)))
    assert json.loads(count.text) == {"nombre_lignes": 0, "confiance": 0.95}
    index = author.answer(Prompt(texts=("inscriptions",), inline=(scan,)))
    assert json.loads(index.text.removeprefix("```json").removesuffix("```")) == []
    acte = author.answer(Prompt(texts=("Transcrivez",), files=(scan,)))
    assert acte.text == "[ILLISIBLE]\n\n[ILLISIBLE]"
    assert acte.usage.media_tokens == {"DOCUMENT": 2 * 258}


def test_other_media_cost_one_image() -> None:
    image = Document("image/png", b"\x89PNG")
    author = Author(seed=0)
    count = author.answer(Prompt(texts=("nombre de lignes",), inline=(image,)))
    assert count.kind is AnswerKind.ACKNOWLEDGEMENT  # only a PDF is an index page
    assert count.usage.media_tokens == {"IMAGE": 258}


@pytest.mark.parametrize(
    "data",
    [make_corrupt_pdf(), make_encrypted_pdf(), make_empty_pdf()],
    ids=["corrupt", "encrypted", "empty"],
)
def test_unreadable_pdfs_are_reported_and_remembered(data: bytes) -> None:
    cache = PdfCache()
    for _ in range(2):
        with pytest.raises(UnreadableDocument):
            cache.read(data)


def test_the_cache_parses_each_pdf_once_and_stays_bounded() -> None:
    cache = PdfCache(capacity=2)
    pdfs = [make_index_pdf(pages=1, rows_per_page=1, seed=seed)[0] for seed in range(3)]
    first = cache.read(pdfs[0])
    assert cache.read(pdfs[0]) is first
    cache.read(pdfs[1])
    cache.read(pdfs[2])
    assert cache.read(pdfs[0]) is not first


def test_samples_are_reproducible_and_rows_round_trip() -> None:
    pdf, rows = make_index_pdf(pages=2, rows_per_page=[3, 7], seed=42)
    again, same_rows = make_index_pdf(pages=2, rows_per_page=[3, 7], seed=42)
    assert (pdf, rows) == (again, same_rows)
    flat = [row for page in rows for row in page]
    assert len({row.numero_publication for row in flat}) == len(flat)
    for row in flat:
        assert parse_row(format_row(row)) == row
        assert len(row.numero_publication) == 6
    assert parse_row("No publication | Date | Nature | Parties | Radiation | Remarques") is None
    with pytest.raises(ValueError, match="rows_per_page"):
        make_index_pdf(pages=2, rows_per_page=[1], seed=0)
    acte, text = make_acte_pdf(pages=2, seed=1)
    assert make_acte_pdf(pages=2, seed=1) == (acte, text)
    assert text.count("\n\n") == 1


def test_fault_rules_fire_by_count_then_disappear() -> None:
    plan = FaultPlan([FaultRule(FaultKind.SERVER_ERROR, count=2, model="m")])
    assert plan.draw({FaultKind.SERVER_ERROR}, "other") is None
    assert plan.draw({FaultKind.UNAVAILABLE}, "m") is None
    assert [plan.draw({FaultKind.SERVER_ERROR}, "m") is not None for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert plan.rules() == []
    assert plan.fired == {"server_error": 2}


def test_fault_rules_from_json_are_validated() -> None:
    rule = FaultRule.from_json({"kind": "hang", "count": 1, "hang_s": 5})
    assert rule == FaultRule(FaultKind.HANG, count=1, hang_s=5)
    for bad in ({"kind": "nope"}, {"kind": "hang", "count": "1"}, {"kind": "hang", "extra": 1}):
        with pytest.raises(ValueError, match=r"kind|count|unknown"):
            FaultRule.from_json(bad)
    with pytest.raises(ValueError, match="fraction"):
        FaultRule(FaultKind.SAFETY, fraction=1.5)
