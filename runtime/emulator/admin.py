"""Admin routes under ``/_emulator/``, for tests and demos to steer the emulator.

- ``GET stats``: the counters (same dict as `Emulator.stats`).
- ``POST reset``: back to the configured state (counters, windows, files, faults).
- ``GET faults`` / ``POST faults`` (a rule, a list of rules, or ``{"faults": [...]}``;
  a rule is ``{"kind", "count"?, "fraction"?, "model"?, "hang_s"?}``) / ``DELETE faults``.
- ``POST quota``: ``{"model"?, "rpm"?, "tpm"?}`` changes limits from now on; a missing
  model means every model, a missing limit keeps its value, null lifts it.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from runtime.emulator.faults import FaultRule
from runtime.emulator.protocol import invalid
from runtime.emulator.quota import Limits
from runtime.emulator.replies import json_reply, read_json
from runtime.emulator.service import EmulatedGemini


class AdminRoutes:
    def __init__(self, service: EmulatedGemini) -> None:
        self.service = service

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_emulator/stats", self.stats),
            web.post("/_emulator/reset", self.reset),
            web.get("/_emulator/faults", self.faults),
            web.post("/_emulator/faults", self.add_faults),
            web.delete("/_emulator/faults", self.clear_faults),
            web.post("/_emulator/quota", self.quota),
        ]

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return json_reply(self.service.stats())

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.service.reset()
        return json_reply(self.service.stats())

    async def faults(self, request: web.Request) -> web.StreamResponse:
        return json_reply({"faults": self.service.faults.rules()})

    async def add_faults(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        entries = body.get("faults", [body]) if isinstance(body, Mapping) else body
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise invalid("Send a fault object, a list of them, or {'faults': [...]}.")
        try:
            rules = [FaultRule.from_json(entry) for entry in entries]
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        for rule in rules:
            self.service.faults.add(rule)
        return json_reply({"faults": self.service.faults.rules()})

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.service.faults.clear()
        return json_reply({"faults": []})

    async def quota(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if not isinstance(body, Mapping):
            raise invalid("Send {'model': ..., 'rpm': ..., 'tpm': ...}.")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise invalid("model must be a string.")
        service = self.service
        default = service.default_limits or Limits(service.config.rpm, service.config.tpm)
        current = service.quota(model).limits if model else default
        rpm, tpm = body.get("rpm", current.rpm), body.get("tpm", current.tpm)
        for limit in (rpm, tpm):
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
            ):
                raise invalid("rpm and tpm must be non-negative integers or null.")
        service.set_quota(model, rpm, tpm)
        return json_reply(service.stats())
