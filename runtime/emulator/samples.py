"""Sample land-registry PDFs for tests and demos, and the row format the emulator reads back.

An index page is a table of inscriptions; each inscription is drawn as ONE text line in the
fixed format below, so that the emulator can recover the rows from the PDF text layer:

    123456 | 2019-04-12 | Vente | Tremblay, Jean; Gagnon, Marie | radiation: — | remarques: —

Fields, in order, separated by `` | ``: the 6-digit publication number, the date
(``YYYY-MM-DD``), the nature, the parties (``Name, Given`` joined by ``; ``), then
``radiation: <text>`` and ``remarques: <text>`` (``—`` when empty). No field contains ``|``.
Headers and footers on the page never start with six digits, so they are not rows.

The PDFs are byte-for-byte reproducible for a given seed (reportlab's invariant mode).
"""

from __future__ import annotations

import io
import random
import re
import textwrap
import zlib
from dataclasses import dataclass

from pypdf import PdfWriter
from reportlab.lib.pagesizes import landscape, letter
from reportlab.pdfgen.canvas import Canvas

EMPTY_FIELD = "—"

NATURES = (
    "Vente",
    "Hypothèque",
    "Quittance",
    "Servitude",
    "Donation",
    "Déclaration de transmission",
    "Préavis d'exercice",
    "Bail",
    "Jugement",
    "Cession de rang",
)

_SURNAMES = (
    "Tremblay", "Gagnon", "Roy", "Côté", "Bouchard", "Gauthier", "Morin", "Lavoie",
    "Fortin", "Gagné", "Ouellet", "Pelletier", "Bélanger", "Lévesque", "Bergeron",
    "Leblanc", "Paquette", "Girard", "Simard", "Boucher", "Caron", "Beaulieu", "Cloutier",
    "Dubé", "Poirier", "Fournier", "Lapointe", "Leclerc", "Lefebvre", "Poulin", "Thibault",
    "St-Pierre", "Nadeau", "Hébert", "Desjardins", "Ménard", "Bérubé", "Labbé", "Bédard",
)  # fmt: skip

_GIVEN_NAMES = (
    "Jean", "Marie", "Pierre", "Louise", "François", "Hélène", "André", "Thérèse",
    "Gérard", "Réjean", "Ginette", "Jérôme", "Geneviève", "Benoît", "Noël", "Élise",
    "Mélanie", "Stéphane", "Frédéric", "Josée", "Sébastien", "Anaïs", "Chloé", "Raphaël",
)  # fmt: skip

_INSTITUTIONS = (
    "Caisse Desjardins de Lévis",
    "Banque Nationale du Canada",
    "Ville de Québec",
    "Société d'habitation du Québec",
    "Hydro-Québec",
)

_REMARKS = (
    "Partie du lot",
    "Avec droit de passage",
    "Mention marginale",
    "Lot rénové",
    "Acte sous seing privé",
)

_ROW_PATTERN = re.compile(
    r"^(?P<numero>\d{6}) \| (?P<date>\d{4}-\d{2}-\d{2}) \| (?P<nature>[^|]+?) \| "
    r"(?P<parties>[^|]+?) \| radiation: (?P<radiation>[^|]*?) \| remarques: (?P<remarques>.*)$"
)

_INDEX_FONT_SIZE = 7
_ACTE_LINES_PER_PAGE = 38


@dataclass(frozen=True)
class IndexRow:
    """One inscription of an index page; the same fields as an extracted JSON record."""

    parties: str
    nature: str
    date: str
    numero_publication: str
    radiation: str
    remarques: str
    confiance: float

    def to_record(self) -> dict[str, str | float]:
        return {
            "parties": self.parties,
            "nature": self.nature,
            "date": self.date,
            "numero_publication": self.numero_publication,
            "radiation": self.radiation,
            "remarques": self.remarques,
            "confiance": self.confiance,
        }


def row_confidence(numero_publication: str) -> float:
    """The confidence the emulator reports for a row: stable, between 0.80 and 0.99."""
    return 0.80 + (zlib.crc32(numero_publication.encode()) % 20) / 100


def format_row(row: IndexRow) -> str:
    return (
        f"{row.numero_publication} | {row.date} | {row.nature} | {row.parties} | "
        f"radiation: {row.radiation} | remarques: {row.remarques}"
    )


def parse_row(line: str) -> IndexRow | None:
    """Read back a line written by `format_row`; None for anything else on the page."""
    match = _ROW_PATTERN.match(line.strip())
    if match is None:
        return None
    numero = match["numero"]
    return IndexRow(
        parties=match["parties"].strip(),
        nature=match["nature"].strip(),
        date=match["date"],
        numero_publication=numero,
        radiation=match["radiation"].strip(),
        remarques=match["remarques"].strip(),
        confiance=round(row_confidence(numero), 2),
    )


def _person(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(_INSTITUTIONS)
    return f"{rng.choice(_SURNAMES)}, {rng.choice(_GIVEN_NAMES)}"


def _random_row(rng: random.Random, numero: str) -> IndexRow:
    date = f"{rng.randint(1975, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    parties = "; ".join(_person(rng) for _ in range(rng.randint(1, 3)))
    radiation = EMPTY_FIELD
    if rng.random() < 0.25:
        radiation = (
            f"Radiée par {rng.randint(100000, 999999)} le "
            f"{rng.randint(1990, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        )
    remarques = rng.choice(_REMARKS) if rng.random() < 0.3 else EMPTY_FIELD
    return IndexRow(
        parties=parties,
        nature=rng.choice(NATURES),
        date=date,
        numero_publication=numero,
        radiation=radiation,
        remarques=remarques,
        confiance=round(row_confidence(numero), 2),
    )


def make_index_pdf(
    pages: int, rows_per_page: int | list[int], seed: int
) -> tuple[bytes, list[list[IndexRow]]]:
    """A scanned-index-like PDF and, per page, the rows drawn on it (in page order)."""
    counts = [rows_per_page] * pages if isinstance(rows_per_page, int) else list(rows_per_page)
    if len(counts) != pages:
        raise ValueError(f"rows_per_page has {len(counts)} entries for {pages} pages")
    rng = random.Random(f"index:{seed}")
    # Publication numbers are unique across the document, as in the registry.
    numbers = rng.sample(range(100000, 1000000), sum(counts))
    buffer = io.BytesIO()
    size = landscape(letter)
    canvas = Canvas(buffer, pagesize=size, invariant=1)
    lot = f"{rng.randint(1, 6)} {rng.randint(100, 999)} {rng.randint(100, 999)}"
    all_rows: list[list[IndexRow]] = []
    for page_number, count in enumerate(counts, start=1):
        rows = [_random_row(rng, str(numbers.pop())) for _ in range(count)]
        all_rows.append(rows)
        _draw_index_page(canvas, size, rows, page_number, pages, lot)
        canvas.showPage()
    canvas.save()
    return buffer.getvalue(), all_rows


def _draw_index_page(
    canvas: Canvas,
    size: tuple[float, float],
    rows: list[IndexRow],
    page_number: int,
    pages: int,
    lot: str,
) -> None:
    width, height = size
    canvas.setFont("Helvetica-Bold", 10)
    canvas.drawString(36, height - 36, "REGISTRE FONCIER DU QUÉBEC — INDEX DES IMMEUBLES")
    canvas.setFont("Helvetica", 8)
    canvas.drawString(
        36, height - 50, f"Circonscription foncière : Québec — Cadastre du Québec — Lot {lot}"
    )
    canvas.drawString(width - 110, height - 36, f"Page {page_number} / {pages}")
    canvas.drawString(
        36, height - 70, "No publication | Date | Nature | Parties | Radiation | Remarques"
    )
    line_height = max(6.0, min(12.0, (height - 110) / max(len(rows), 1)))
    canvas.setFont("Helvetica", _INDEX_FONT_SIZE)
    y = height - 84
    for row in rows:
        canvas.drawString(36, y, format_row(row))
        canvas.line(36, y - 2, width - 36, y - 2)
        y -= line_height


_NOTARIES = ("Me Lucie Gagnon", "Me Pierre-Luc Côté", "Me Hélène Bérubé", "Me André Simard")
_CITIES = ("Québec", "Lévis", "Rimouski", "Saguenay", "Trois-Rivières", "Sherbrooke")
_CLAUSES = (
    "Le vendeur déclare que l'immeuble est libre de toute hypothèque, priorité ou charge "
    "quelconque, à l'exception des servitudes apparentes.",
    "L'acquéreur prendra possession de l'immeuble à compter de la signature des présentes "
    "et en aura la jouissance à compter de la même date.",
    "Les parties déclarent que le prix de vente a été payé comptant, dont quittance totale "
    "et finale.",
    "Le vendeur fait les déclarations suivantes et s'en porte garant : il est propriétaire "
    "de l'immeuble pour l'avoir acquis aux termes d'un acte publié au bureau de la publicité "
    "des droits.",
    "Les taxes foncières municipales et scolaires seront réparties entre les parties à la "
    "date de signature des présentes.",
    "Le droit de mutation est établi sur la base d'imposition déclarée ci-dessous, "
    "conformément à la Loi concernant les droits sur les mutations immobilières.",
    "Les parties élisent domicile à leurs adresses respectives indiquées ci-dessus pour "
    "l'exécution des présentes.",
)


def _acte_lines(rng: random.Random, count: int) -> list[str]:
    lines: list[str] = []
    while len(lines) < count:
        paragraph = " ".join(rng.sample(_CLAUSES, rng.randint(1, 3)))
        if rng.random() < 0.4:
            paragraph = (
                f"ONT COMPARU : {_person(rng).replace(',', '')}, domicilié à "
                f"{rng.choice(_CITIES)}, devant {rng.choice(_NOTARIES)}, notaire. {paragraph}"
            )
        lines.extend(textwrap.wrap(paragraph, width=92))
    return lines[:count]


def make_acte_pdf(pages: int, seed: int) -> tuple[bytes, str]:
    """A typed deed in French; the text is its lines joined by newlines, pages by blank lines."""
    rng = random.Random(f"acte:{seed}")
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=letter, invariant=1)
    _, height = letter
    page_texts: list[str] = []
    for page_number in range(1, pages + 1):
        lines = _acte_lines(rng, _ACTE_LINES_PER_PAGE)
        if page_number == 1:
            lines[0] = f"ACTE DE VENTE — numéro {rng.randint(1000, 99999)} des minutes"
        canvas.setFont("Times-Roman", 11)
        y = height - 60
        for line in lines:
            canvas.drawString(60, y, line)
            y -= 17
        canvas.showPage()
        page_texts.append("\n".join(lines))
    canvas.save()
    return buffer.getvalue(), "\n\n".join(page_texts)


def make_imageonly_pdf(pages: int = 1) -> bytes:
    """Pages with drawings but no text layer, like a scan that was never OCRed."""
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=letter, invariant=1)
    width, height = letter
    for _ in range(pages):
        for step in range(20):
            y = height - 60 - step * 30
            canvas.line(40, y, width - 40, y)
        canvas.rect(40, 40, width - 80, height - 80)
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def make_encrypted_pdf(password: str = "secret") -> bytes:
    """An index page encrypted with a user password: unreadable without it."""
    plain, _ = make_index_pdf(1, 3, seed=0)
    from pypdf import PdfReader

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(plain)))
    # RC4 needs no optional crypto dependency, unlike AES.
    writer.encrypt(user_password=password, owner_password=None, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_empty_pdf() -> bytes:
    """A well-formed PDF with zero pages (reportlab always emits a page; pypdf does not)."""
    out = io.BytesIO()
    PdfWriter().write(out)
    return out.getvalue()


def make_corrupt_pdf() -> bytes:
    """Bytes that start like a PDF and are cut off before any object can be read."""
    return b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\ngarbage\x00\xff"
