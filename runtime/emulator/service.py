"""The emulated model: state shared by every route, and the model routes themselves.

Only generateContent and streamGenerateContent count against the RPM/TPM quotas, at the
moment they arrive (an unreadable or invalid call too, at no token cost); countTokens and
the File API never do.

When output sizes are uncertain (``output_cv`` > 0), the emulator counts how many times it
has answered each request (by `request_key`): every call charged for an answer, faulted ones
included, is one occurrence; calls refused by the quota or invalid are not. Reset forgets
these counts, so a run after a reset replays like a fresh emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from runtime.emulator.config import EmulatorConfig
from runtime.emulator.content import (
    Answer,
    AnswerKind,
    Document,
    Prompt,
    UnreadableDocument,
    request_key,
)
from runtime.emulator.faults import RESPONSE_FAULTS, FaultKind, FaultPlan, FaultRule
from runtime.emulator.files import FileState, FileStore
from runtime.emulator.protocol import (
    ApiError,
    GenerateRequest,
    file_id_from_uri,
    invalid,
    parse_generate_request,
    quota_error,
)
from runtime.emulator.quota import Dimension, Limits, RollingQuota
from runtime.emulator.replies import VERSION, json_reply, read_json, require_api_key
from runtime.emulator.responses import MALFORMED_EVENT, response_body, sse_events
from runtime.emulator.stats import ModelCounters

_FAULT_ERRORS = {
    FaultKind.HANG: (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    FaultKind.SERVER_ERROR: (500, "INTERNAL", "An internal error has occurred. Please retry."),
    FaultKind.UNAVAILABLE: (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    FaultKind.BARE_429: (
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
    ),
}


class EmulatedGemini:
    """Quotas, files, faults and counters of one emulator, and its model routes."""

    def __init__(self, config: EmulatorConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self.closing = asyncio.Event()
        self.author = config.author()
        self.reset()

    def reset(self) -> None:
        """Back to the configured state: no counters, no window history, no files."""
        self.quotas: dict[str, RollingQuota] = {}
        self.counters: dict[str, ModelCounters] = {}
        self.default_limits: Limits | None = None
        self.files = FileStore(processing_polls=self.config.processing_polls, seed=self.config.seed)
        self.faults = FaultPlan(self.config.faults, seed=self.config.seed)
        self.count_tokens_calls = 0
        # request_key -> answers charged so far; the occurrence of the next output size draw.
        self.occurrences: dict[bytes, int] = {}
        for model in self.config.model_quotas:
            self.quota(model)

    def quota(self, model: str) -> RollingQuota:
        found = self.quotas.get(model)
        if found is None:
            limits = self.config.limits_for(model)
            if self.default_limits is not None and model not in self.config.model_quotas:
                limits = self.default_limits
            found = RollingQuota(
                limits, self.config.window_s, rejected_count=self.config.rejected_count_rpm
            )
            self.quotas[model] = found
            self.counters[model] = ModelCounters()
        return found

    def set_quota(self, model: str | None, rpm: int | None, tpm: int | None) -> None:
        """Change limits from now on (every model when None); calls already in the window
        keep counting."""
        limits = Limits(rpm=rpm, tpm=tpm)
        if model is None:
            self.default_limits = limits
            for quota in self.quotas.values():
                quota.limits = limits
        else:
            self.quota(model).limits = limits

    def stats(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "models": {
                model: self.counters[model].snapshot(quota, self.config.tpm_counts, now)
                for model, quota in sorted(self.quotas.items())
            },
            "files": {
                "uploaded": self.files.uploaded,
                "deleted": self.files.deleted,
                "stored": self.files.stored,
                "failed": self.files.failed,
            },
            "count_tokens_calls": self.count_tokens_calls,
            "faults_fired": dict(self.faults.fired),
        }

    async def pause(self, seconds: float) -> None:
        """Sleep without blocking the loop; cut short when the server stops."""
        if seconds <= 0 or self.closing.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.closing.wait()

    def readable(self, document: Document) -> bool:
        try:
            self.author.pages(document)
        except UnreadableDocument:
            return False
        return True

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"/{VERSION}/models/{{target}}", self.model_action),
            web.get(f"/{VERSION}/models/{{target}}", self.model_info),
        ]

    async def model_action(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock()
        require_api_key(request, self.config.require_api_key)
        model, _, action = request.match_info["target"].partition(":")
        if action == "generateContent":
            return await self._generate(request, model, arrived, stream=False)
        if action == "streamGenerateContent":
            return await self._generate(request, model, arrived, stream=True)
        if action == "countTokens":
            return await self._count_tokens(request)
        raise ApiError(404, "NOT_FOUND", f"Method {action or 'get'} is not supported.")

    async def model_info(self, request: web.Request) -> web.StreamResponse:
        require_api_key(request, self.config.require_api_key)
        model = request.match_info["target"]
        return json_reply(
            {
                "name": f"models/{model}",
                "displayName": model,
                "inputTokenLimit": 1_048_576,
                "outputTokenLimit": 65_536,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
        )

    def _prompt(self, parsed: GenerateRequest) -> Prompt:
        files = []
        for ref in parsed.files:
            file_id = file_id_from_uri(ref.uri)
            stored = self.files.peek(file_id)
            if stored is None:
                raise ApiError(404, "NOT_FOUND", f"File {file_id} does not exist.")
            if stored.state is not FileState.ACTIVE:
                raise ApiError(
                    400,
                    "FAILED_PRECONDITION",
                    f"The File {file_id} is not in an ACTIVE state and usage is not allowed.",
                )
            files.append(Document(ref.mime_type or stored.mime_type, stored.data))
        prompt = Prompt(
            texts=parsed.texts,
            system_texts=parsed.system_texts,
            inline=tuple(Document(blob.mime_type, blob.data) for blob in parsed.inline),
            files=tuple(files),
            max_output_tokens=parsed.max_output_tokens,
            response_mime_type=parsed.response_mime_type,
        )
        try:
            self.author.prompt_usage(prompt)
        except UnreadableDocument as exc:
            raise invalid(str(exc)) from exc
        return prompt

    async def _generate(
        self, request: web.Request, model: str, arrived: float, *, stream: bool
    ) -> web.StreamResponse:
        quota, counters = self.quota(model), self.counters[model]
        counters.requests += 1
        refusal: ApiError | None = None
        prompt: Prompt | None = None
        answer: Answer | None = None
        key: bytes | None = None
        occurrence = 0
        cost = 0
        try:
            prompt = self._prompt(parse_generate_request(await read_json(request)))
            if self.config.output_cv > 0:
                key = request_key(prompt)
                occurrence = self.occurrences.get(key, 0)
            answer = self.author.answer(prompt, occurrence=occurrence)
            usage = answer.usage
            cost = usage.prompt_tokens if self.config.tpm_counts == "input" else usage.total_tokens
        except ApiError as exc:
            refusal = exc
        decision = quota.admit(arrived, cost)
        if not decision.admitted:
            counters.rejected += 1
            counters.http_429 += 1
            values: dict[Dimension, int | None] = {
                Dimension.REQUESTS: quota.limits.rpm,
                Dimension.TOKENS: quota.limits.tpm,
            }
            raise quota_error(
                model,
                decision.violations,
                decision.retry_after,
                values,
                tokens_are_total=self.config.tpm_counts == "total",
            )
        counters.admitted += 1
        if refusal is not None or prompt is None or answer is None:
            counters.invalid += 1
            raise refusal or invalid("Request could not be read.")
        fault = self.faults.draw(RESPONSE_FAULTS, model)
        if (
            answer.kind is AnswerKind.INDEX
            and not self.author.expects_all_rows(prompt)
            and self.faults.draw({FaultKind.DROP_ROWS}, model) is not None
        ):
            answer = self.author.answer(prompt, drop_last_row=True, occurrence=occurrence)
        # No await since the occurrence was read: concurrent identical calls draw in turn.
        if key is not None:
            self.occurrences[key] = occurrence + 1
        usage = answer.usage
        counters.input_tokens += usage.prompt_tokens
        counters.output_tokens += usage.output_tokens
        counters.thoughts_tokens += usage.thoughts_tokens
        counters.total_tokens += usage.total_tokens
        if fault is not None:
            counters.faults[fault.kind.value] = counters.faults.get(fault.kind.value, 0) + 1
            if fault.kind in _FAULT_ERRORS:
                if fault.kind is FaultKind.BARE_429:
                    counters.http_429 += 1
                return await self._fault_error(fault)
        per_token = self.config.latency_per_output_token_ms * usage.output_tokens
        await self.pause((self.config.latency_ms + per_token) / 1000)
        kind = fault.kind if fault is not None else None
        body = response_body(
            model,
            answer,
            blocked=kind is FaultKind.SAFETY,
            with_usage=kind is not FaultKind.NO_USAGE,
        )
        malformed = kind is FaultKind.MALFORMED_JSON
        if not stream:
            if malformed:
                return web.Response(text=json.dumps(body)[:40], content_type="application/json")
            return json_reply(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in [MALFORMED_EVENT] if malformed else sse_events(body):
            await response.write(event)
        await response.write_eof()
        return response

    async def _fault_error(self, fault: FaultRule) -> web.StreamResponse:
        code, status, message = _FAULT_ERRORS[fault.kind]
        await self.pause(fault.hang_s if fault.kind is FaultKind.HANG else 0.0)
        await self.pause(self.config.latency_ms / 1000)
        return json_reply(ApiError(code, status, message).body(), status=code)

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, Mapping):
            nested = body.get("generateContentRequest") or body.get("generate_content_request")
            body = nested if isinstance(nested, Mapping) else body
        prompt = self._prompt(parse_generate_request(body))
        self.count_tokens_calls += 1
        text, media = self.author.prompt_usage(prompt)
        details = [{"modality": "TEXT", "tokenCount": text}]
        details += [{"modality": m, "tokenCount": n} for m, n in sorted(media.items())]
        return json_reply(
            {"totalTokens": text + sum(media.values()), "promptTokensDetails": details}
        )
