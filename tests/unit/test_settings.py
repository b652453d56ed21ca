"""Settings: defaults, parsing, and a clear error naming each invalid variable."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from runtime.errors import ConfigurationError
from runtime.settings import ModelLimit, Settings, env_example, redact_url, variables

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_documented_contract() -> None:
    settings = Settings.from_env({})
    assert settings.gemini_rpm_limit == 2000
    assert settings.gemini_tpm_limit == 8_000_000
    assert settings.gemini_safety_factor == 0.9
    assert settings.gemini_window_s == 60.0
    assert settings.worker_types == ("index", "acte")
    assert settings.redis_url is None
    assert (settings.rpm_budget, settings.tpm_budget) == (1800, 7_200_000)


def test_values_are_parsed_into_types() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://ocr:pw@db.example:5432/registre",
            "REDIS_URL": "redis://cache:6379/0",
            "GEMINI_RPM_LIMIT": "150",
            "GEMINI_WINDOW_S": "1.5",
            "GEMINI_TPM_COUNTS": "TOTAL",
            "GEMINI_LANE_SHARES": "index=0.3, acte=0.7",
            "GEMINI_MODEL_LIMITS": "gemini-2.5-pro=150/2000000,gemini-2.5-flash=1000/4000000",
            "WORKER_TYPES": "acte",
            "METRICS_PORT": "9100",
            "LOG_FORMAT": "console",
        }
    )
    assert settings.gemini_rpm_limit == 150
    assert settings.gemini_window_s == 1.5
    assert settings.gemini_tpm_counts == "total"
    assert settings.gemini_lane_shares == {"index": 0.3, "acte": 0.7}
    assert settings.gemini_model_limits["gemini-2.5-pro"] == ModelLimit(150, 2_000_000)
    assert settings.worker_types == ("acte",)
    assert settings.metrics_port == 9100


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://x/y"),
        ("DATABASE_STATEMENT_CACHE_SIZE", "-1"),
        ("REDIS_URL", "localhost:6379"),
        ("GEMINI_BASE_URL", "ftp://emulator"),
        ("GEMINI_RPM_LIMIT", "0"),
        ("GEMINI_RPM_LIMIT", "lots"),
        ("GEMINI_TPM_LIMIT", "-5"),
        ("GEMINI_SAFETY_FACTOR", "1.5"),
        ("GEMINI_SAFETY_FACTOR", "0"),
        ("GEMINI_WINDOW_S", "nan"),
        ("GEMINI_WINDOW_S", "-60"),
        ("GEMINI_ARRIVAL_SKEW_S", "-0.1"),
        ("GEMINI_TPM_COUNTS", "output"),
        ("GEMINI_RPD_LIMIT", "1e3"),
        ("GEMINI_LANE_SHARES", "index:0.3"),
        ("GEMINI_LANE_SHARES", "index=2"),
        ("GEMINI_LANE_SHARES", "index=0.6,acte=0.6"),
        ("GEMINI_MODEL_LIMITS", "gemini-2.5-pro=150"),
        ("GEMINI_MODEL_LIMITS", "gemini-2.5-pro=x/y"),
        ("GEMINI_MAX_INFLIGHT", "0"),
        ("GEMINI_TIMEOUT_S", "never"),
        ("WORKER_TYPES", "plan_cadastraux"),
        ("WORKER_TYPES", ","),
        ("WORKER_CONCURRENCY", "many"),
        ("WORKER_DRAIN_S", "0"),
        ("JOB_LEASE_S", "-1"),
        ("POLL_INTERVAL_S", "soon"),
        ("DOCUMENTS_URL", "s3://bucket"),
        ("DOCUMENTS_MAX_BYTES", "0"),
        ("INDEX_MAX_PAGES", "x"),
        ("METRICS_PORT", "70000"),
        ("MONITOR_ALERT_AT", "80"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "verbose"),
    ],
)
def test_each_invalid_value_is_named_in_the_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")


def test_every_invalid_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"GEMINI_RPM_LIMIT": "x", "LOG_LEVEL": "loud"})
    assert [name for name, _ in caught.value.problems] == ["GEMINI_RPM_LIMIT", "LOG_LEVEL"]


def test_an_invalid_url_error_does_not_echo_its_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"DATABASE_URL": "mysql://admin:hunter22@db/x"})
    assert "hunter22" not in str(caught.value)


def test_redacted_view_hides_keys_and_url_passwords() -> None:
    settings = Settings.from_env(
        {
            "GEMINI_API_KEY": "AIzaSecretValue",
            "SUPABASE_SERVICE_KEY": "service-role-secret",
            "DATABASE_URL": "postgresql://ocr:db-pass-1@db:5432/registre",
            "REDIS_URL": "redis://:redis-pass-2@cache:6379/0",
        }
    )
    text = repr(settings.redacted())
    for secret in ("AIzaSecretValue", "service-role-secret", "db-pass-1", "redis-pass-2"):
        assert secret not in text
        assert secret in settings.secrets()
    assert settings.redacted()["DATABASE_URL"] == "postgresql://ocr:***@db:5432/registre"


def test_redact_url_leaves_urls_without_password_alone() -> None:
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_every_field_has_a_variable_and_env_example_lists_them_all() -> None:
    names = {variable for variable, _, _ in variables()}
    assert {f.name.upper() for f in fields(Settings)} == names
    assert (ROOT / ".env.example").read_text() == env_example()
