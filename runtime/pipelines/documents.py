"""Where a row's PDF comes from: a local directory or Supabase Storage over HTTP.

``DOCUMENTS_URL`` picks the store: ``file:///some/dir`` reads ``/some/dir/<bucket>/<path>``;
an ``http(s)://`` base reads ``<base>/storage/v1/object/<bucket>/<path>`` with the service
key as bearer token. A missing object fails its row for good; an outage is transient.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

import anyio
import httpx

from runtime.errors import ConfigurationError, PermanentError, TransientError

# One bucket per document type, as the extractor stores them.
BUCKETS: Mapping[str, str] = {
    "index": "index",
    "acte": "actes",
    "plan_cadastraux": "plans-cadastraux",
}


class DocumentNotFound(PermanentError):
    """The document is not in the store."""


class DocumentTooLarge(PermanentError):
    """The document is larger than DOCUMENTS_MAX_BYTES."""


class DocumentStore(Protocol):
    """Reads the PDF of a queue row."""

    async def fetch(self, document_source: str, path: str) -> bytes: ...

    async def aclose(self) -> None: ...


def bucket_of(document_source: str) -> str:
    try:
        return BUCKETS[document_source]
    except KeyError:
        raise PermanentError(f"unknown document_source {document_source!r}") from None


def _checked_path(path: str | None) -> str:
    if not path or not path.strip():
        raise PermanentError("the row has no supabase_path")
    return path.strip().lstrip("/")


class LocalDocuments:
    """Documents in a directory tree laid out like the storage buckets."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self._root = root.resolve()
        self._max_bytes = max_bytes

    async def fetch(self, document_source: str, path: str) -> bytes:
        relative = _checked_path(path)
        bucket = bucket_of(document_source)
        target = (self._root / bucket / relative).resolve()
        if not target.is_relative_to(self._root / bucket):
            raise PermanentError(f"document path {relative!r} leaves bucket {bucket!r}")
        where = f"{bucket}/{relative}"
        try:
            size = (await anyio.Path(target).stat()).st_size
            if size > self._max_bytes:
                raise DocumentTooLarge(f"document {where} has {size} bytes, over the limit")
            return await anyio.Path(target).read_bytes()
        except FileNotFoundError:
            raise DocumentNotFound(f"document not found: {where}") from None
        except IsADirectoryError:
            raise DocumentNotFound(f"document not found: {where} is a directory") from None
        except OSError as exc:
            raise TransientError(f"cannot read document {where}: {exc}") from exc

    async def aclose(self) -> None:
        return None


class SupabaseDocuments:
    """Documents in Supabase Storage (or any server speaking its object API)."""

    def __init__(
        self,
        base_url: str,
        service_key: str | None,
        *,
        max_bytes: int,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {service_key}"} if service_key else {}
        if service_key:
            headers["apikey"] = service_key
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )
        self._max_bytes = max_bytes

    async def fetch(self, document_source: str, path: str) -> bytes:
        relative = _checked_path(path)
        bucket = bucket_of(document_source)
        where = f"{bucket}/{relative}"
        url = f"/storage/v1/object/{quote(bucket)}/{quote(relative)}"
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    body = (await response.aread())[:500].decode("utf-8", "replace")
                    raise self._error(response.status_code, body, where)
                declared = int(response.headers.get("content-length") or 0)
                if declared > self._max_bytes:
                    raise DocumentTooLarge(f"document {where} has {declared} bytes, over the limit")
                chunks: list[bytes] = []
                received = 0
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    if received > self._max_bytes:
                        raise DocumentTooLarge(f"document {where} is over {self._max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise TransientError(f"storage timed out reading {where}") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"storage unreachable reading {where}: {exc}") from exc

    @staticmethod
    def _error(status: int, body: str, where: str) -> Exception:
        # Supabase answers a missing object with 404, or with 400 and "not_found" inside.
        if status == 404 or (status == 400 and "not_found" in body.replace(" ", "_").lower()):
            return DocumentNotFound(f"document not found in storage: {where}")
        if status in (401, 403):
            # A bad key concerns every row: retry later rather than failing documents.
            return TransientError(
                f"storage refused access to {where} (HTTP {status}): check SUPABASE_SERVICE_KEY"
            )
        if status == 429 or status >= 500:
            return TransientError(f"storage answered HTTP {status} for {where}")
        return PermanentError(f"storage answered HTTP {status} for {where}: {body[:200]}")

    async def aclose(self) -> None:
        await self._client.aclose()


class MemoryDocuments:
    """Documents held in memory, keyed by (bucket, path): tests and demos."""

    def __init__(self, objects: Mapping[tuple[str, str], bytes] | None = None) -> None:
        self.objects: dict[tuple[str, str], bytes] = dict(objects or {})

    async def fetch(self, document_source: str, path: str) -> bytes:
        key = (bucket_of(document_source), _checked_path(path))
        try:
            return self.objects[key]
        except KeyError:
            raise DocumentNotFound(f"document not found: {key[0]}/{key[1]}") from None

    async def aclose(self) -> None:
        return None


def open_documents(url: str | None, service_key: str | None, *, max_bytes: int) -> DocumentStore:
    """The store that ``DOCUMENTS_URL`` names."""
    if not url:
        raise ConfigurationError(
            "DOCUMENTS_URL", "required: file:///dir or https://<project>.supabase.co"
        )
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalDocuments(Path(parts.path), max_bytes=max_bytes)
    return SupabaseDocuments(url, service_key, max_bytes=max_bytes)
