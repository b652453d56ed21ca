"""Bodies of generateContent answers, whole or as server-sent events."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from runtime.emulator.content import Answer

# What a stream cut off mid-object looks like on the wire.
MALFORMED_EVENT = b'data: {"candidates": [{"content": \r\n\r\n'

_SAFETY_BLOCK = {
    "finishReason": "SAFETY",
    "index": 0,
    "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
    ],
}


def response_body(
    model: str, answer: Answer, *, blocked: bool = False, with_usage: bool = True
) -> dict[str, Any]:
    """A GenerateContentResponse; a blocked answer has no content and no output tokens."""
    usage = answer.usage
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": answer.text}], "role": "model"},
        "finishReason": answer.finish_reason,
        "index": 0,
    }
    output_tokens = usage.output_tokens
    if blocked:
        output_tokens = 0
        candidate = dict(_SAFETY_BLOCK)
    details = [{"modality": "TEXT", "tokenCount": usage.text_tokens}]
    details += [{"modality": m, "tokenCount": n} for m, n in sorted(usage.media_tokens.items())]
    metadata: dict[str, Any] = {
        "promptTokenCount": usage.prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": usage.prompt_tokens + output_tokens + usage.thoughts_tokens,
        "promptTokensDetails": details,
    }
    if usage.thoughts_tokens:
        metadata["thoughtsTokenCount"] = usage.thoughts_tokens
    body: dict[str, Any] = {
        "candidates": [candidate],
        "modelVersion": model,
        "responseId": hashlib.sha256(answer.text.encode()).hexdigest()[:22],
    }
    if with_usage:
        body["usageMetadata"] = metadata
    return body


def sse_events(body: dict[str, Any]) -> list[bytes]:
    """The same answer as a few ``data:`` events; the last one carries the finish reason
    and the usage, as the real stream does."""
    candidate = body["candidates"][0]
    content = candidate.get("content")
    pieces = split_text(content["parts"][0]["text"]) if content else [""]
    events = []
    for number, piece in enumerate(pieces, start=1):
        last = number == len(pieces)
        chunk: dict[str, Any] = {
            "modelVersion": body["modelVersion"],
            "responseId": body["responseId"],
        }
        if content:
            part: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}}
            part["index"] = 0
            if last:
                part["finishReason"] = candidate["finishReason"]
            chunk["candidates"] = [part]
        else:
            chunk["candidates"] = [candidate]
        if last and "usageMetadata" in body:
            chunk["usageMetadata"] = body["usageMetadata"]
        events.append(f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n".encode())
    return events


def split_text(text: str, pieces: int = 3) -> list[str]:
    """Cut a text in a few chunks at spaces, as a stream would deliver it."""
    if len(text) < 2 * pieces:
        return [text]
    size = len(text) // pieces
    cuts = [0]
    for number in range(1, pieces):
        cut = text.find(" ", number * size)
        if cut > cuts[-1]:
            cuts.append(cut)
    cuts.append(len(text))
    return [text[start:end] for start, end in itertools.pairwise(cuts) if end > start]
