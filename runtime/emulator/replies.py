"""HTTP plumbing shared by the emulator's routes: JSON replies, API keys, error middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from runtime.emulator.protocol import ApiError, invalid

logger = logging.getLogger(__name__)

# The API versions the SDK may be pointed at; all behave alike here.
VERSION = r"{version:v1|v1beta|v1alpha}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_reply(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        payload,
        status=status,
        headers=headers,
        dumps=lambda value: json.dumps(value, ensure_ascii=False),
    )


def origin(request: web.Request) -> str:
    """This server's scheme://host:port as the client reached it, for absolute URLs."""
    return f"{request.scheme}://{request.host}"


def require_api_key(request: web.Request, required: bool) -> None:
    if not required or request.headers.get("x-goog-api-key") or request.query.get("key"):
        return
    raise ApiError(
        403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers. Use an API key."
    )


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"Invalid JSON payload received. {exc}") from exc


async def read_json(request: web.Request) -> Any:
    return parse_json(await request.read())


@web.middleware
async def google_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as Google-shaped JSON: the SDK only parses application/json."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_reply(exc.body(), status=exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = "NOT_FOUND" if exc.status == 404 else "INVALID_ARGUMENT"
        return json_reply(ApiError(exc.status, status, exc.reason).body(), status=exc.status)
    except Exception:
        logger.exception("emulator handler failed on %s %s", request.method, request.path)
        error = ApiError(500, "INTERNAL", "Internal error encountered.")
        return json_reply(error.body(), status=500)
