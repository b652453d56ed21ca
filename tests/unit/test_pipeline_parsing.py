"""Reading model answers, and cutting long texts for the boost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.pipelines.acte import paragraph_chunks
from runtime.pipelines.parsing import UnreadableAnswer, read_inscriptions, read_line_count

RECORD = (
    '{"parties": "Tremblay, Jean; Gagnon, Marie", "nature": "Vente", "date": "2019-04-12",'
    ' "numero_publication": "123456", "radiation": "", "remarques": "", "confiance": 0.9}'
)


def test_line_count_in_a_code_fence_with_stray_text() -> None:
    answer = 'Voici le résultat :\n```json\n{"nombre_lignes": 12, "confiance": 0.95}\n```'
    count = read_line_count(answer)
    assert (count.count, count.confidence) == (12, 0.95)


@pytest.mark.parametrize(
    "answer", ["", "douze lignes", '{"nombre_lignes": "beaucoup"}', '{"nombre_lignes": -1}']
)
def test_line_count_that_says_nothing_usable(answer: str) -> None:
    with pytest.raises(UnreadableAnswer):
        read_line_count(answer)


def test_inscriptions_keep_only_records_with_a_six_digit_number() -> None:
    other = RECORD.replace("123456", "12 34 5")
    spaced = RECORD.replace("123456", "654 321")
    records = read_inscriptions(f'[{RECORD}, {other}, {spaced}, "texte"]')
    assert [r["numero_publication"] for r in records] == ["123456", "654321"]
    assert records[0]["parties"] == "Tremblay, Jean; Gagnon, Marie"
    assert records[0]["confiance"] == 0.9


def test_truncated_array_keeps_the_complete_records() -> None:
    answer = f'```json\n[{RECORD}, {RECORD.replace("123456", "222222")}, {{"parties": "Rob'
    records = read_inscriptions(answer)
    assert [r["numero_publication"] for r in records] == ["123456", "222222"]


def test_wrapped_list_and_unreadable_answers() -> None:
    assert len(read_inscriptions(f'{{"inscriptions": [{RECORD}]}}')) == 1
    assert read_inscriptions("[]") == []
    with pytest.raises(UnreadableAnswer):
        read_inscriptions("aucune inscription")
    with pytest.raises(UnreadableAnswer):
        read_inscriptions("[{broken")


def test_chunks_cut_between_paragraphs() -> None:
    text = "\n\n".join(["a" * 40, "b" * 40, "c" * 40])
    assert paragraph_chunks(text, 90) == ["a" * 40 + "\n\n" + "b" * 40, "c" * 40]
    assert paragraph_chunks(text, 1000) == [text]


@given(
    st.lists(st.text(alphabet="abc \n", min_size=0, max_size=80), min_size=1, max_size=30),
    st.integers(min_value=5, max_value=200),
)
def test_chunks_respect_the_limit_and_lose_no_word(paragraphs: list[str], limit: int) -> None:
    text = "\n\n".join(paragraphs)
    chunks = paragraph_chunks(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())
