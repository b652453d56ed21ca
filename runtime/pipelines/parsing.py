"""Reading model answers that are meant to be JSON but are not always clean.

Models wrap JSON in code fences, add a sentence before it, or stop mid-array when they run
out of output tokens. These readers keep what can be trusted and say when nothing can.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
_PUBLICATION_NUMBER = re.compile(r"[0-9]{6}")


class UnreadableAnswer(ValueError):
    """The answer holds no JSON that can be read."""


def _unfenced(text: str) -> str:
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _first_json(text: str, opener: str) -> Any:
    body = _unfenced(text)
    start = body.find(opener)
    if start < 0:
        raise UnreadableAnswer(f"no {opener!r} in the answer")
    decoder = json.JSONDecoder()
    try:
        value, _ = decoder.raw_decode(body[start:])
        return value
    except json.JSONDecodeError:
        pass
    if opener != "[":
        raise UnreadableAnswer("the JSON object in the answer is incomplete")
    # A truncated array: keep every complete element before the cut.
    items: list[Any] = []
    position = start + 1
    while True:
        while position < len(body) and body[position] in " \t\r\n,":
            position += 1
        if position >= len(body) or body[position] == "]":
            return items
        try:
            item, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            if not items:
                raise UnreadableAnswer("the JSON array in the answer is unreadable") from None
            return items
        items.append(item)


@dataclass(frozen=True)
class LineCount:
    count: int
    confidence: float | None


def read_line_count(text: str) -> LineCount:
    """``{"nombre_lignes": N, "confiance": c}``, tolerating fences and stray text."""
    value = _first_json(text, "{")
    if not isinstance(value, dict):
        raise UnreadableAnswer("the line count is not a JSON object")
    raw = value.get("nombre_lignes", value.get("count"))
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw.strip())
    # JSON as Python reads it allows NaN and Infinity, which are no count of lines.
    count = _number(raw)
    if count is None or count < 0:
        raise UnreadableAnswer(f"the line count is not a number of lines: {raw!r}")
    confidence = value.get("confiance", value.get("confidence"))
    return LineCount(count=int(count), confidence=_number(confidence))


def _number(value: Any) -> float | None:
    """A finite number, or None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _optional(value: Any) -> str:
    """A field that may be empty: a lone dash, as the registry writes it, is empty."""
    text = _text(value)
    return "" if text.strip("—–-") == "" else text


def read_inscriptions(text: str) -> list[dict[str, Any]]:
    """Inscription records; entries without a 6-digit publication number are not ones."""
    value = _first_json(text, "[")
    if isinstance(value, dict):  # some answers wrap the list: {"inscriptions": [...]}
        value = next((v for v in value.values() if isinstance(v, list)), [])
    if not isinstance(value, list):
        raise UnreadableAnswer("the inscriptions are not a JSON array")
    records = []
    for item in value:
        if not isinstance(item, dict):
            continue
        number = _text(item.get("numero_publication")).replace(" ", "")
        if not _PUBLICATION_NUMBER.fullmatch(number):
            continue
        records.append(
            {
                "parties": _text(item.get("parties")),
                "nature": _text(item.get("nature")),
                "date": _text(item.get("date")),
                "numero_publication": number,
                "radiation": _optional(item.get("radiation")),
                "remarques": _optional(item.get("remarques")),
                "confiance": _number(item.get("confiance")),
            }
        )
    return records
