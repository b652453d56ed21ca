"""The File API routes: resumable upload (start, then chunks), get, list and delete.

None of them counts against the generate quotas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from runtime.emulator.content import Document
from runtime.emulator.faults import FaultKind
from runtime.emulator.files import FileState
from runtime.emulator.protocol import ApiError, invalid
from runtime.emulator.replies import VERSION, json_reply, origin, parse_json, require_api_key
from runtime.emulator.service import EmulatedGemini

CHUNK_GRANULARITY = 8 * 1024 * 1024


class FileRoutes:
    def __init__(self, service: EmulatedGemini) -> None:
        self.service = service

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"/upload/{VERSION}/files", self.upload),
            web.get(f"/{VERSION}/files", self.list_files),
            web.get(f"/{VERSION}/files/{{file_id}}", self.get_file),
            web.delete(f"/{VERSION}/files/{{file_id}}", self.delete_file),
        ]

    def _check_key(self, request: web.Request) -> None:
        require_api_key(request, self.service.config.require_api_key)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        # Start and chunks share the path, as on Google's servers; the upload id tells them apart.
        upload_id = request.query.get("upload_id")
        if upload_id is None:
            return await self._start(request)
        return await self._chunk(request, upload_id)

    async def _start(self, request: web.Request) -> web.StreamResponse:
        self._check_key(request)
        if request.headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable":
            raise invalid("Only the resumable upload protocol is supported.")
        if request.headers.get("X-Goog-Upload-Command", "").lower() != "start":
            raise invalid("An upload must start with X-Goog-Upload-Command: start.")
        raw = await request.read()
        metadata: Any = parse_json(raw) if raw.strip() else {}
        described = metadata.get("file", {}) if isinstance(metadata, Mapping) else None
        if not isinstance(described, Mapping):
            raise invalid("The upload body must be {'file': {...}}.")
        mime = request.headers.get("X-Goog-Upload-Header-Content-Type") or described.get(
            "mimeType", described.get("mime_type", "application/octet-stream")
        )
        size_header = request.headers.get("X-Goog-Upload-Header-Content-Length", "")
        declared = int(size_header) if size_header.isdigit() else None
        display = described.get("displayName", described.get("display_name"))
        upload_id = self.service.files.begin_upload(display, str(mime), declared)
        version = request.match_info["version"]
        # Absolute, as Google's is: the SDK posts the chunks to exactly this URL.
        url = f"{origin(request)}/upload/{version}/files?upload_id={upload_id}"
        return web.Response(
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Control-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": str(CHUNK_GRANULARITY),
            },
            content_type="application/json",
            text="{}",
        )

    async def _chunk(self, request: web.Request, upload_id: str) -> web.StreamResponse:
        # Every chunk reply carries X-Goog-Upload-Status, errors included: without it the
        # SDK re-sends the chunk for several seconds before giving up.
        final = {"X-Goog-Upload-Status": "final"}
        files = self.service.files
        pending = files.pending(upload_id)
        if pending is None:
            error = ApiError(404, "NOT_FOUND", f"Upload {upload_id} is unknown or finished.")
            return json_reply(error.body(), status=404, headers=final)
        header = request.headers.get("X-Goog-Upload-Command", "")
        command = {word.strip().lower() for word in header.split(",")}
        offset = request.headers.get("X-Goog-Upload-Offset", str(len(pending.received)))
        chunk = await request.read()
        if not offset.isdigit() or int(offset) != len(pending.received):
            received = len(pending.received)
            message = f"Upload offset {offset} does not match {received} bytes received."
            return json_reply(invalid(message).body(), status=400, headers=final)
        pending.received.extend(chunk)
        if "finalize" not in command:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        # A document the model cannot open fails processing, as on the real File API.
        failed = self.service.faults.draw({FaultKind.UPLOAD_FAILED}) is not None
        document = Document(pending.mime_type, bytes(pending.received))
        failed = failed or not self.service.readable(document)
        stored = files.finish_upload(upload_id, FileState.FAILED if failed else FileState.ACTIVE)
        return json_reply({"file": stored.resource(origin(request))}, headers=final)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        self._check_key(request)
        file_id = request.match_info["file_id"]
        found = self.service.files.poll(file_id)
        if found is None:
            raise ApiError(404, "NOT_FOUND", f"File {file_id} does not exist.")
        stored, shown = found
        return json_reply(stored.resource(origin(request), shown))

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        self._check_key(request)
        here = origin(request)
        listing = [stored.resource(here) for stored in self.service.files.listing()]
        return json_reply({"files": listing})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        self._check_key(request)
        file_id = request.match_info["file_id"]
        if not self.service.files.delete(file_id):
            raise ApiError(404, "NOT_FOUND", f"File {file_id} does not exist.")
        return json_reply({})
