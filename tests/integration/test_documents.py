"""Document sources: a local tree and a server that behaves like Supabase Storage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from runtime.errors import ConfigurationError, PermanentError, TransientError
from runtime.pipelines.documents import (
    DocumentNotFound,
    DocumentTooLarge,
    LocalDocuments,
    MemoryDocuments,
    SupabaseDocuments,
    open_documents,
)

KEY = "service-role-key-for-tests"
PDF = b"%PDF-1.4 fake but long enough " * 100


class FakeStorage:
    """Supabase Storage's object endpoint, with its ways of failing."""

    def __init__(self) -> None:
        self.objects = {("actes", "1234-Montreal-20240101.pdf"): PDF}
        self.failures: list[int] = []
        self.seen_auth: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_auth.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if self.failures:
            return web.json_response({"error": "boom"}, status=self.failures.pop(0))
        key = (request.match_info["bucket"], request.match_info["path"])
        if key not in self.objects:
            # Older Supabase versions say "not found" with a 400.
            body = {"statusCode": "404", "error": "not_found", "message": "Object not found"}
            return web.json_response(body, status=400)
        response = web.StreamResponse()
        response.content_type = "application/pdf"
        await response.prepare(request)
        data = self.objects[key]
        for start in range(0, len(data), 256):
            await response.write(data[start : start + 256])
        return response


@pytest.fixture
async def storage() -> AsyncIterator[tuple[FakeStorage, str]]:
    fake = FakeStorage()
    app = web.Application()
    app.router.add_get("/storage/v1/object/{bucket}/{path:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_supabase_reads_the_object_of_the_right_bucket(
    storage: tuple[FakeStorage, str],
) -> None:
    fake, url = storage
    store = open_documents(url, KEY, max_bytes=1_000_000)
    try:
        assert await store.fetch("acte", "1234-Montreal-20240101.pdf") == PDF
    finally:
        await store.aclose()
    assert fake.seen_auth == [f"Bearer {KEY}"]


async def test_supabase_missing_object_is_permanent(storage: tuple[FakeStorage, str]) -> None:
    _, url = storage
    store = SupabaseDocuments(url, KEY, max_bytes=1_000_000)
    try:
        with pytest.raises(DocumentNotFound, match=r"actes/nope\.pdf"):
            await store.fetch("acte", "nope.pdf")
    finally:
        await store.aclose()


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_supabase_outage_is_transient(storage: tuple[FakeStorage, str], status: int) -> None:
    fake, url = storage
    fake.failures.append(status)
    store = SupabaseDocuments(url, KEY, max_bytes=1_000_000)
    try:
        with pytest.raises(TransientError, match=str(status)):
            await store.fetch("acte", "1234-Montreal-20240101.pdf")
    finally:
        await store.aclose()


async def test_supabase_bad_key_is_transient_and_names_the_setting(
    storage: tuple[FakeStorage, str],
) -> None:
    _, url = storage
    store = SupabaseDocuments(url, "wrong-key", max_bytes=1_000_000)
    try:
        with pytest.raises(TransientError, match="SUPABASE_SERVICE_KEY"):
            await store.fetch("acte", "1234-Montreal-20240101.pdf")
    finally:
        await store.aclose()


async def test_supabase_size_cap_stops_the_stream(storage: tuple[FakeStorage, str]) -> None:
    _, url = storage
    store = SupabaseDocuments(url, KEY, max_bytes=1000)
    try:
        with pytest.raises(DocumentTooLarge):
            await store.fetch("acte", "1234-Montreal-20240101.pdf")
    finally:
        await store.aclose()


async def test_unreachable_storage_is_transient() -> None:
    store = SupabaseDocuments("http://127.0.0.1:9", KEY, max_bytes=1000, timeout_s=2)
    try:
        with pytest.raises(TransientError, match="unreachable"):
            await store.fetch("index", "a.pdf")
    finally:
        await store.aclose()


async def test_local_tree_uses_the_bucket_layout(tmp_path: Path) -> None:
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "42-Quebec.pdf").write_bytes(PDF)
    store = open_documents(tmp_path.as_uri(), None, max_bytes=1_000_000)
    assert await store.fetch("index", "42-Quebec.pdf") == PDF
    with pytest.raises(DocumentNotFound, match=r"actes/42-Quebec\.pdf"):
        await store.fetch("acte", "42-Quebec.pdf")
    with pytest.raises(PermanentError, match="leaves bucket"):
        await store.fetch("index", "../../etc/passwd")
    with pytest.raises(PermanentError, match="no supabase_path"):
        await store.fetch("index", "")
    with pytest.raises(PermanentError, match="unknown document_source"):
        await store.fetch("plans", "42-Quebec.pdf")
    with pytest.raises(DocumentTooLarge):
        await LocalDocuments(tmp_path, max_bytes=10).fetch("index", "42-Quebec.pdf")


async def test_memory_twin_and_missing_url() -> None:
    store = MemoryDocuments({("actes", "a.pdf"): PDF})
    assert await store.fetch("acte", "a.pdf") == PDF
    with pytest.raises(DocumentNotFound):
        await store.fetch("acte", "b.pdf")
    with pytest.raises(ConfigurationError, match="DOCUMENTS_URL"):
        open_documents(None, None, max_bytes=1)
