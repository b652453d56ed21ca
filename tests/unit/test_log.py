"""Secrets never reach the log output, whatever path they take."""

from __future__ import annotations

import io
import json
import logging

import structlog

from runtime.log import SecretRedactor, configure_logging
from runtime.settings import Settings


def test_a_key_from_the_environment_never_reaches_the_output() -> None:
    settings = Settings.from_env(
        {
            "GEMINI_API_KEY": "AIzaSy-very-secret",
            "DATABASE_URL": "postgresql://ocr:pg-secret@db:5432/registre",
        }
    )
    out = io.StringIO()
    configure_logging(log_format="json", secrets=settings.secrets(), stream=out)
    log = structlog.get_logger()
    log.info("calling gemini", key=settings.gemini_api_key, nested={"url": settings.database_url})
    log.warning("header x-goog-api-key: AIzaSy-very-secret was rejected")
    try:
        raise ValueError(f"bad key {settings.gemini_api_key}")
    except ValueError:
        log.exception("call failed")
    logging.getLogger("httpx").warning("connect to %s failed", settings.database_url)

    text = out.getvalue()
    assert "AIzaSy-very-secret" not in text
    assert "pg-secret" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["key"] == "***"
    assert lines[0]["nested"]["url"] == "postgresql://ocr:***@db:5432/registre"
    assert "bad key ***" in lines[2]["exception"]
    assert len(lines) == 4


def test_url_passwords_are_redacted_even_when_not_configured() -> None:
    redactor = SecretRedactor([])
    assert redactor.redact("redis://:p4ss@cache:6379") == "redis://:***@cache:6379"
    assert redactor.redact("see https://example.org/path") == "see https://example.org/path"


def test_console_format_and_level_filter() -> None:
    out = io.StringIO()
    configure_logging(log_format="console", level="warning", secrets=["tok3n-value"], stream=out)
    log = structlog.get_logger()
    log.info("not shown")
    log.warning("shown", token="tok3n-value")
    text = out.getvalue()
    assert "not shown" not in text
    assert "shown" in text
    assert "tok3n-value" not in text
