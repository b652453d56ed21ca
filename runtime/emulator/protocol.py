"""Wire shapes of the Gemini REST API: request parsing (camelCase or snake_case), response
and error bodies in Google's format."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.emulator.quota import Dimension

QUOTA_IDS = {
    Dimension.REQUESTS: "GenerateRequestsPerMinutePerProjectPerModel",
    Dimension.TOKENS: "GenerateContentInputTokensPerModelPerMinute",
}
TOTAL_TOKENS_QUOTA_ID = "GenerateContentTotalTokensPerModelPerMinute"
QUOTA_METRICS = {
    Dimension.REQUESTS: "generativelanguage.googleapis.com/generate_requests_per_model",
    Dimension.TOKENS: "generativelanguage.googleapis.com/generate_content_input_token_count",
}
TOTAL_TOKENS_METRIC = "generativelanguage.googleapis.com/generate_content_total_token_count"


class ApiError(Exception):
    """An error answer: HTTP code, Google status and message, optional details."""

    def __init__(
        self,
        code: int,
        status: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def format_duration(seconds: float) -> str:
    """A protobuf Duration in JSON ("37s", "1.250s", "0.000125s"), rounded UP to the
    microsecond so that waiting that long is always enough."""
    micros = math.ceil(round(seconds * 1_000_000, 3))
    whole, frac = divmod(micros, 1_000_000)
    if frac == 0:
        return f"{whole}s"
    if frac % 1000 == 0:
        return f"{whole}.{frac // 1000:03d}s"
    return f"{whole}.{frac:06d}s"


def quota_error(
    model: str,
    violations: tuple[Dimension, ...],
    retry_after: float | None,
    values: Mapping[Dimension, int | None],
    *,
    tokens_are_total: bool,
) -> ApiError:
    """A RESOURCE_EXHAUSTED answer naming each violated quota, with the exact delay."""
    entries: list[dict[str, Any]] = []
    for dimension in violations:
        quota_id, metric = QUOTA_IDS[dimension], QUOTA_METRICS[dimension]
        if dimension is Dimension.TOKENS and tokens_are_total:
            quota_id, metric = TOTAL_TOKENS_QUOTA_ID, TOTAL_TOKENS_METRIC
        entries.append(
            {
                "quotaMetric": metric,
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": str(values.get(dimension)),
            }
        )
    names = ", ".join(entry["quotaMetric"] for entry in entries)
    message = "You exceeded your current quota, please check your plan and billing details. "
    message += f"Quota exceeded for metric: {names}, model: {model}."
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": entries}
    ]
    if retry_after is not None:
        delay = format_duration(retry_after)
        message += f" Please retry in {delay}."
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    return ApiError(429, "RESOURCE_EXHAUSTED", message, details)


def field(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    """A field under either spelling: the SDK mixes both in one request."""
    if camel in mapping:
        return mapping[camel]
    return mapping.get(snake)


@dataclass(frozen=True)
class InlineData:
    mime_type: str
    data: bytes


@dataclass(frozen=True)
class FileRef:
    uri: str
    mime_type: str | None


@dataclass(frozen=True)
class GenerateRequest:
    """The parts of a generateContent body the emulator acts on."""

    texts: tuple[str, ...]
    system_texts: tuple[str, ...]
    inline: tuple[InlineData, ...]
    files: tuple[FileRef, ...]
    max_output_tokens: int | None = None
    response_mime_type: str | None = None


def parse_generate_request(body: Any) -> GenerateRequest:
    if not isinstance(body, Mapping):
        raise invalid("Invalid JSON payload: expected an object.")
    texts: list[str] = []
    inline: list[InlineData] = []
    files: list[FileRef] = []
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise invalid("* GenerateContentRequest.contents: contents is not specified")
    for content in contents:
        _collect_parts(content, texts, inline, files)
    system_texts: list[str] = []
    system = field(body, "systemInstruction", "system_instruction")
    if system is not None:
        _collect_parts(system, system_texts, inline, files)
    config = field(body, "generationConfig", "generation_config") or {}
    if not isinstance(config, Mapping):
        raise invalid("generationConfig must be an object.")
    max_tokens = field(config, "maxOutputTokens", "max_output_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise invalid("generationConfig.maxOutputTokens must be a positive integer.")
    mime = field(config, "responseMimeType", "response_mime_type")
    return GenerateRequest(
        texts=tuple(texts),
        system_texts=tuple(system_texts),
        inline=tuple(inline),
        files=tuple(files),
        max_output_tokens=max_tokens,
        response_mime_type=mime if isinstance(mime, str) else None,
    )


def _collect_parts(
    content: Any, texts: list[str], inline: list[InlineData], files: list[FileRef]
) -> None:
    if not isinstance(content, Mapping) or not isinstance(content.get("parts"), list):
        raise invalid("Each content needs a list of parts.")
    for part in content["parts"]:
        if not isinstance(part, Mapping):
            raise invalid("Each part must be an object.")
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif (blob := field(part, "inlineData", "inline_data")) is not None:
            inline.append(_inline(blob))
        elif (ref := field(part, "fileData", "file_data")) is not None:
            uri = field(ref, "fileUri", "file_uri") if isinstance(ref, Mapping) else None
            if not isinstance(uri, str):
                raise invalid("fileData.fileUri is required.")
            mime = field(ref, "mimeType", "mime_type")
            files.append(FileRef(uri=uri, mime_type=mime if isinstance(mime, str) else None))


def _inline(blob: Any) -> InlineData:
    if not isinstance(blob, Mapping):
        raise invalid("inlineData must be an object.")
    mime, data = field(blob, "mimeType", "mime_type"), blob.get("data")
    if not isinstance(mime, str) or not isinstance(data, str):
        raise invalid("inlineData needs mimeType and data.")
    try:
        raw = base64.b64decode(data, altchars=b"-_" if "-" in data or "_" in data else None)
    except (binascii.Error, ValueError) as exc:
        raise invalid("inlineData.data is not valid base64.") from exc
    return InlineData(mime_type=mime, data=raw)


def file_id_from_uri(uri: str) -> str:
    """The ID in ``https://host/v1beta/files/ID`` or ``files/ID``."""
    marker = "files/"
    index = uri.rfind(marker)
    if index < 0:
        raise invalid(f"Unsupported file uri: {uri}")
    return uri[index + len(marker) :].split("?", 1)[0]
