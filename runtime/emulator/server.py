"""`Emulator`: the emulated Gemini REST API served by aiohttp inside the current process.

Routes: ``/{v1,v1beta,v1alpha}/models/{model}:generateContent``, ``:streamGenerateContent``
(``?alt=sse``), ``:countTokens``; ``/upload/{version}/files`` (resumable upload);
``/{version}/files[/{id}]`` (get, list, delete); and the admin routes of `admin`.
Only the generate calls count against the quotas.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from runtime.emulator.admin import AdminRoutes
from runtime.emulator.config import EmulatorConfig
from runtime.emulator.faults import FaultRule
from runtime.emulator.file_routes import FileRoutes
from runtime.emulator.replies import google_errors
from runtime.emulator.service import EmulatedGemini

# Inline PDFs travel base64-encoded inside JSON, and upload chunks are 8 MB.
_MAX_BODY = 512 * 1024 * 1024


class Emulator:
    """The emulated API served on a local port; use ``async with Emulator(config) as emu``."""

    def __init__(
        self, config: EmulatorConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or EmulatorConfig()
        self.service = EmulatedGemini(self.config, clock)
        self.app = web.Application(middlewares=[google_errors], client_max_size=_MAX_BODY)
        self.app.add_routes(self.service.routes())
        self.app.add_routes(FileRoutes(self.service).routes())
        self.app.add_routes(AdminRoutes(self.service).routes())
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the emulator is already started")
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
        except OSError:
            sock.close()
            raise
        # A hanging fault may hold a request open; stop() wakes it, so a short grace is enough.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        self._port = sock.getsockname()[1]
        self.service.closing.clear()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.service.closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """The same dictionary as ``GET /_emulator/stats``."""
        return self.service.stats()

    def reset(self) -> None:
        """Forget counters, quota windows, files and added faults (``POST /_emulator/reset``)."""
        self.service.reset()

    def add_fault(self, rule: FaultRule) -> None:
        self.service.faults.add(rule)

    def clear_faults(self) -> None:
        self.service.faults.clear()

    def set_quota(self, model: str | None, rpm: int | None, tpm: int | None) -> None:
        """New limits for `model` (every model when None) from now on."""
        self.service.set_quota(model, rpm, tpm)
