"""The emulated File API's storage: resumable uploads in memory and file lifecycles.

A finished upload is PROCESSING for ``processing_polls`` reads, then reaches its final
state: ACTIVE, or FAILED when a fault said so or the document cannot be opened.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

RETENTION = timedelta(hours=48)


class FileState(enum.StrEnum):
    PROCESSING = "PROCESSING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"


@dataclass
class StoredFile:
    file_id: str
    display_name: str | None
    mime_type: str
    data: bytes
    created: datetime
    final_state: FileState
    polls_left: int

    @property
    def state(self) -> FileState:
        return FileState.PROCESSING if self.polls_left > 0 else self.final_state

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def resource(self, origin: str, state: FileState | None = None) -> dict[str, Any]:
        """The File JSON; `origin` is this server's scheme://host:port."""
        state = state or self.state
        resource: dict[str, Any] = {
            "name": f"files/{self.file_id}",
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": _timestamp(self.created),
            "updateTime": _timestamp(self.created),
            "expirationTime": _timestamp(self.created + RETENTION),
            "sha256Hash": self.sha256,
            "uri": f"{origin}/v1beta/files/{self.file_id}",
            "state": state.value,
            "source": "UPLOADED",
        }
        if self.display_name:
            resource["displayName"] = self.display_name
        if state is FileState.FAILED:
            resource["error"] = {"code": 400, "message": "The file could not be processed."}
        return resource


@dataclass
class PendingUpload:
    display_name: str | None
    mime_type: str
    declared_size: int | None
    received: bytearray = field(default_factory=bytearray)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FileStore:
    """Uploaded files by ID, with the counters the stats report."""

    def __init__(self, *, processing_polls: int, seed: int) -> None:
        self.processing_polls = processing_polls
        self._seed = seed
        self._serial = 0
        self._uploads: dict[str, PendingUpload] = {}
        self._files: dict[str, StoredFile] = {}
        self.uploaded = 0
        self.deleted = 0
        self.failed = 0

    def _next_id(self, prefix: str) -> str:
        self._serial += 1
        return hashlib.sha256(f"{prefix}:{self._seed}:{self._serial}".encode()).hexdigest()[:12]

    def begin_upload(
        self, display_name: str | None, mime_type: str, declared_size: int | None
    ) -> str:
        upload_id = self._next_id("upload")
        self._uploads[upload_id] = PendingUpload(display_name, mime_type, declared_size)
        return upload_id

    def pending(self, upload_id: str) -> PendingUpload | None:
        return self._uploads.get(upload_id)

    def finish_upload(self, upload_id: str, final_state: FileState) -> StoredFile:
        upload = self._uploads.pop(upload_id)
        stored = StoredFile(
            file_id=self._next_id("file"),
            display_name=upload.display_name,
            mime_type=upload.mime_type,
            data=bytes(upload.received),
            created=datetime.now(UTC),
            final_state=final_state,
            polls_left=self.processing_polls,
        )
        self._files[stored.file_id] = stored
        self.uploaded += 1
        if final_state is FileState.FAILED:
            self.failed += 1
        return stored

    def poll(self, file_id: str) -> tuple[StoredFile, FileState] | None:
        """Read a file as files.get does; returns it with the state this read shows.

        Exactly `processing_polls` reads show PROCESSING; the file is usable once the last
        of them has been answered.
        """
        stored = self._files.get(file_id)
        if stored is None:
            return None
        shown = stored.state
        if stored.polls_left > 0:
            stored.polls_left -= 1
        return stored, shown

    def peek(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def delete(self, file_id: str) -> bool:
        if self._files.pop(file_id, None) is None:
            return False
        self.deleted += 1
        return True

    def listing(self) -> list[StoredFile]:
        return list(self._files.values())

    @property
    def stored(self) -> int:
        return len(self._files)
