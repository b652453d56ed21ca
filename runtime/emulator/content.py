"""Deterministic, believable answers of the emulated model, chosen from the request.

The kind of answer is picked from the request in this order; keywords are matched in the
prompt text (system instruction and user text), case-insensitively, as substrings:

a) a ``fileData`` part (an uploaded acte) -> ACTE EXTRACTION: the text layer of the file
   (pages joined by blank lines), with about 3% of words replaced by ``[?]`` and 0.5% by
   ``[ILLISIBLE]``, chosen by the seed and the file's content hash. A page without a text
   layer reads ``[ILLISIBLE]``.
b) ``nombre de lignes`` and an inline PDF -> LINE COUNT: ``{"nombre_lignes": N,
   "confiance": 0.95}`` where N is the number of inscription rows (see `samples`) on the
   inline pages; 0 for a page without a text layer. This keyword wins over c), so an
   extraction prompt must not contain it.
c) ``inscriptions`` and an inline PDF -> INDEX EXTRACTION: a JSON array with one record per
   row (parties, nature, date, numero_publication, radiation, remarques, confiance),
   sometimes wrapped in a ```json fence (never when responseMimeType is JSON). With the
   ``drop_rows`` fault the last row of the page is left out, unless the prompt also
   contains ``attendu`` (the completeness retry, which states the expected count).
d) ``corrige`` (as in "corrigez", "corriger") and no file -> BOOST: the text after the first
   line that is exactly ``---``, without ``[?]`` markers, whitespace normalised.
e) anything else -> a short acknowledgement.

Token accounting: 258 prompt tokens per PDF page or image (DOCUMENT / IMAGE modality),
one token per 4 characters of text, rounded up; output tokens likewise from the answer
text. ``maxOutputTokens`` truncates any answer (finishReason ``MAX_TOKENS``). When the
response MIME type is ``application/json``, plain-text answers are wrapped as
``{"texte": ...}`` so the text is always JSON.

Uncertain output sizes: the output token count the text gives is multiplied by a factor
drawn by `output_factor` (a seeded lognormal of mean ``output_scale`` and coefficient of
variation ``output_cv``), rounded up, and capped by ``maxOutputTokens``; the text itself is
unchanged. The draw depends only on the seed, `request_key` of the prompt and how many
times the same request was answered before, so a run replays exactly and a client that
knows its prompt can predict the usage of its first call (see `Author`).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
import math
import random
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from pypdf import PdfReader
from pypdf.errors import PyPdfError

from runtime.emulator.samples import parse_row

PAGE_TOKENS = 258
CHARS_PER_TOKEN = 4
DOUBTFUL_RATE = 0.03
ILLEGIBLE_RATE = 0.005
FENCE_RATE = 0.3
JSON_MIME = "application/json"

_BOOST_SEPARATOR = "---"


class UnreadableDocument(Exception):
    """A document the model cannot open: corrupt, encrypted or without pages."""


class AnswerKind(enum.StrEnum):
    ACTE = "acte"
    LINE_COUNT = "line_count"
    INDEX = "index"
    BOOST = "boost"
    ACKNOWLEDGEMENT = "acknowledgement"


@dataclass(frozen=True)
class Document:
    mime_type: str
    data: bytes


@dataclass(frozen=True)
class Prompt:
    """What the answer depends on: texts, inline documents and resolved uploaded files."""

    texts: tuple[str, ...]
    system_texts: tuple[str, ...] = ()
    inline: tuple[Document, ...] = ()
    files: tuple[Document, ...] = ()
    max_output_tokens: int | None = None
    response_mime_type: str | None = None

    @property
    def lowered(self) -> str:
        return "\n".join((*self.system_texts, *self.texts)).lower()


@dataclass(frozen=True)
class Usage:
    text_tokens: int
    media_tokens: dict[str, int]
    output_tokens: int
    thoughts_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + sum(self.media_tokens.values())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.thoughts_tokens


@dataclass(frozen=True)
class Answer:
    kind: AnswerKind
    text: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class PdfText:
    digest: str
    pages: tuple[str, ...]


def text_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def check_output_spread(scale: float, cv: float) -> None:
    """Raise ValueError unless `scale` is finite and > 0 and `cv` is finite and >= 0."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"output_scale must be a finite number > 0, got {scale!r}")
    if not (math.isfinite(cv) and cv >= 0):
        raise ValueError(f"output_cv must be a finite number >= 0, got {cv!r}")


def request_key(prompt: Prompt) -> bytes:
    """A sha256 digest of what the request says: system texts, texts, inline documents and
    uploaded files (MIME type and bytes), in that order.

    Uploaded files count by their content, not their URI, so the key is known before the
    upload and does not depend on the ID the server gives the file. Generation options
    (``maxOutputTokens``, response MIME type) are not part of it.
    """
    digest = hashlib.sha256()

    def add(tag: bytes, value: bytes) -> None:
        # Tagged and length-prefixed, so that no two different requests run together.
        digest.update(tag + len(value).to_bytes(8, "big") + value)

    for text in prompt.system_texts:
        add(b"S", text.encode())
    for text in prompt.texts:
        add(b"T", text.encode())
    for tag, documents in ((b"I", prompt.inline), (b"F", prompt.files)):
        for document in documents:
            add(tag, document.mime_type.encode())
            add(tag, document.data)
    return digest.digest()


def output_factor(seed: int, key: bytes, occurrence: int, scale: float, cv: float) -> float:
    """The factor applied to the output size of the `occurrence`-th answer (0 for the first)
    to the request whose `request_key` is `key`.

    Lognormal with mean `scale` and coefficient of variation `cv`; exactly `scale` when `cv`
    is 0. Pure: its own generator is seeded from (seed, key, occurrence), so the same
    arguments give the same factor in any process, and the global `random` is untouched.
    """
    check_output_spread(scale, cv)
    if occurrence < 0:
        raise ValueError(f"occurrence must be >= 0, got {occurrence}")
    if cv == 0:
        return scale
    material = f"output-size:{seed}:{occurrence}:".encode() + key
    rng = random.Random(int.from_bytes(hashlib.sha256(material).digest(), "big"))
    sigma2 = math.log1p(cv * cv)
    return rng.lognormvariate(math.log(scale) - sigma2 / 2, math.sqrt(sigma2))


def scaled_output_tokens(natural: int, factor: float, limit: int | None) -> int:
    """`natural` output tokens times `factor`, rounded up, at least 1, at most `limit`.

    An empty answer stays at 0: there is nothing to scale. The product is rounded to nine
    decimals before rounding up, so that 10 x 1.1 counts 11 tokens, not 12.
    """
    if natural <= 0:
        return 0
    scaled = max(1, math.ceil(round(natural * factor, 9)))
    return scaled if limit is None else min(scaled, limit)


def _fraction(*key: object) -> float:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class PdfCache:
    """Text layers of PDFs by content hash, so each PDF is parsed once however often sent."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, PdfText | UnreadableDocument] = OrderedDict()

    def read(self, data: bytes) -> PdfText:
        digest = hashlib.sha256(data).hexdigest()
        entry = self._entries.get(digest)
        if entry is None:
            entry = self._parse(digest, data)
            self._entries[digest] = entry
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(digest)
        if isinstance(entry, UnreadableDocument):
            raise entry
        return entry

    @staticmethod
    def _parse(digest: str, data: bytes) -> PdfText | UnreadableDocument:
        # pypdf reports recoverable damage through warnings and logging; the verdict here is
        # only "readable or not", and the host's warning filters must not turn it into a crash.
        pypdf_log = logging.getLogger("pypdf")
        level = pypdf_log.level
        pypdf_log.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = PdfReader(io.BytesIO(data))
                if reader.is_encrypted:
                    return UnreadableDocument("The document is password protected.")
                pages = tuple(page.extract_text() or "" for page in reader.pages)
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            return UnreadableDocument(f"Unable to process input document: {exc}")
        finally:
            pypdf_log.setLevel(level)
        if not pages:
            return UnreadableDocument("The document has no pages.")
        return PdfText(digest=digest, pages=pages)


class Author:
    """Writes the emulated model's answers; the same request, seed and options give the same
    answer.

    An `Author` keeps no history: `answer` is a function of the prompt, the options given
    here and the `occurrence` passed in (the serving emulator counts occurrences per
    `request_key`). So a client that knows its prompt can predict the exact usage of the
    first occurrence of a request: an `Author` built with the emulator's seed and options
    (``EmulatorConfig.author()`` builds the very one the emulator uses), in any process,
    gives ``answer(prompt).usage`` equal to what the emulator reports for its first answer
    to that request, unless a fault alters that answer. Predicting consumes nothing on the
    serving emulator; ``answer(prompt, occurrence=n)`` predicts the (n+1)-th answer.
    """

    def __init__(
        self,
        seed: int,
        *,
        pdfs: PdfCache | None = None,
        thinking_ratio: float = 0.0,
        output_scale: float = 1.0,
        output_cv: float = 0.0,
    ) -> None:
        check_output_spread(output_scale, output_cv)
        self.seed = seed
        self.pdfs = pdfs or PdfCache()
        self.thinking_ratio = thinking_ratio
        self.output_scale = output_scale
        self.output_cv = output_cv

    def classify(self, prompt: Prompt) -> AnswerKind:
        lowered = prompt.lowered
        has_pdf = any(doc.mime_type == "application/pdf" for doc in prompt.inline)
        if prompt.files:
            return AnswerKind.ACTE
        if has_pdf and "nombre de lignes" in lowered:
            return AnswerKind.LINE_COUNT
        if has_pdf and "inscriptions" in lowered:
            return AnswerKind.INDEX
        if "corrige" in lowered:
            return AnswerKind.BOOST
        return AnswerKind.ACKNOWLEDGEMENT

    @staticmethod
    def expects_all_rows(prompt: Prompt) -> bool:
        return "attendu" in prompt.lowered

    def pages(self, document: Document) -> tuple[str, ...]:
        """The text layer of a document, one string per page; raises UnreadableDocument."""
        if document.mime_type == "application/pdf":
            return self.pdfs.read(document.data).pages
        if document.mime_type.startswith("text/"):
            return (document.data.decode("utf-8", errors="replace"),)
        return ("",)

    def prompt_usage(self, prompt: Prompt) -> tuple[int, dict[str, int]]:
        """Text tokens and tokens per media modality, as countTokens reports them."""
        media: dict[str, int] = {}
        chars = sum(len(text) for text in (*prompt.system_texts, *prompt.texts))
        for document in (*prompt.inline, *prompt.files):
            if document.mime_type.startswith("text/"):
                chars += len(self.pages(document)[0])
                continue
            modality = "DOCUMENT" if document.mime_type == "application/pdf" else "IMAGE"
            media[modality] = media.get(modality, 0) + PAGE_TOKENS * len(self.pages(document))
        return text_tokens(chars), media

    def output_size_factor(self, prompt: Prompt, occurrence: int = 0) -> float:
        """The output size factor of the `occurrence`-th answer to `prompt`."""
        if occurrence < 0:
            raise ValueError(f"occurrence must be >= 0, got {occurrence}")
        if self.output_cv == 0:
            # No draw, so no need to hash the request.
            return self.output_scale
        key = request_key(prompt)
        return output_factor(self.seed, key, occurrence, self.output_scale, self.output_cv)

    def answer(self, prompt: Prompt, *, drop_last_row: bool = False, occurrence: int = 0) -> Answer:
        """The answer to `prompt`, the `occurrence`-th time (from 0) it is asked.

        The text depends on the prompt and seed only; the output token count is the text's,
        scaled by `output_factor`, and the thinking tokens follow the scaled count.
        """
        kind = self.classify(prompt)
        json_mode = (prompt.response_mime_type or "").startswith(JSON_MIME)
        if kind is AnswerKind.ACTE:
            text = self._acte(prompt)
        elif kind is AnswerKind.LINE_COUNT:
            pages = [page for doc in self._inline_pages(prompt) for page in self._rows(doc)]
            rows = sum(len(page_rows) for page_rows in pages)
            text = json.dumps({"nombre_lignes": rows, "confiance": 0.95})
        elif kind is AnswerKind.INDEX:
            text = self._index(prompt, drop_last_row=drop_last_row, json_mode=json_mode)
        elif kind is AnswerKind.BOOST:
            text = boost_text(prompt.texts)
        else:
            text = self._acknowledgement(prompt)
        if json_mode and kind in (AnswerKind.ACTE, AnswerKind.BOOST, AnswerKind.ACKNOWLEDGEMENT):
            text = json.dumps({"texte": text}, ensure_ascii=False)
        finish = "STOP"
        limit = prompt.max_output_tokens
        if limit is not None and text_tokens(len(text)) > limit:
            text, finish = text[: limit * CHARS_PER_TOKEN], "MAX_TOKENS"
        text_count, media = self.prompt_usage(prompt)
        output = scaled_output_tokens(
            text_tokens(len(text)), self.output_size_factor(prompt, occurrence), limit
        )
        usage = Usage(
            text_tokens=text_count,
            media_tokens=media,
            output_tokens=output,
            thoughts_tokens=math.ceil(output * self.thinking_ratio),
        )
        return Answer(kind=kind, text=text, finish_reason=finish, usage=usage)

    def _inline_pages(self, prompt: Prompt) -> list[tuple[str, ...]]:
        return [self.pages(doc) for doc in prompt.inline if doc.mime_type == "application/pdf"]

    @staticmethod
    def _rows(pages: tuple[str, ...]) -> list[list[dict[str, str | float]]]:
        found = []
        for page in pages:
            rows = (parse_row(line) for line in page.splitlines())
            found.append([row.to_record() for row in rows if row is not None])
        return found

    def _index(self, prompt: Prompt, *, drop_last_row: bool, json_mode: bool) -> str:
        records: list[dict[str, str | float]] = []
        for pages in self._inline_pages(prompt):
            for page_rows in self._rows(pages):
                records.extend(page_rows[:-1] if drop_last_row else page_rows)
        text = json.dumps(records, ensure_ascii=False, indent=2)
        digest = hashlib.sha256(b"".join(doc.data for doc in prompt.inline)).hexdigest()
        if not json_mode and _fraction(self.seed, digest, "fence") < FENCE_RATE:
            text = f"```json\n{text}\n```"
        return text

    def _acte(self, prompt: Prompt) -> str:
        pieces = []
        for document in prompt.files:
            digest = hashlib.sha256(document.data).hexdigest()
            rng = random.Random(f"{self.seed}:{digest}")
            for page in self.pages(document):
                pieces.append(mark_doubtful_words(page, rng) if page.strip() else "[ILLISIBLE]")
        return "\n\n".join(pieces)

    def _acknowledgement(self, prompt: Prompt) -> str:
        chars = sum(len(text) for text in prompt.texts)
        reference = hashlib.sha256(f"{self.seed}:{prompt.lowered}".encode()).hexdigest()[:8]
        documents = len(prompt.inline) + len(prompt.files)
        return (
            f"Bien reçu : {chars} caractères de consigne et {documents} document(s). "
            f"Référence {reference}."
        )


def mark_doubtful_words(text: str, rng: random.Random) -> str:
    """Replace a few words by ``[?]`` or ``[ILLISIBLE]``, keeping the layout."""

    def replace(match: re.Match[str]) -> str:
        draw = rng.random()
        if draw < ILLEGIBLE_RATE:
            return "[ILLISIBLE]"
        if draw < ILLEGIBLE_RATE + DOUBTFUL_RATE:
            return "[?]"
        return match.group(0)

    return re.sub(r"\S+", replace, text)


def boost_text(texts: tuple[str, ...]) -> str:
    """The text after the first ``---`` line, without ``[?]`` marks, whitespace normalised."""
    lines = "\n".join(texts).splitlines()
    for index, line in enumerate(lines):
        if line.strip() == _BOOST_SEPARATOR:
            lines = lines[index + 1 :]
            break
    body = re.sub(r"[ \t]*\[\?\]", "", "\n".join(lines))
    paragraphs = re.split(r"\n\s*\n", body)
    cleaned = (" ".join(paragraph.split()) for paragraph in paragraphs)
    return "\n\n".join(paragraph for paragraph in cleaned if paragraph)
