"""The only reader of the environment: typed, frozen, validated settings.

Every invalid value is reported at start with the name of its variable and what it
accepts; the process does not start half-configured.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runtime.errors import ConfigurationError

DOCUMENT_TYPES = ("index", "acte")
SECRET_VARIABLES = ("GEMINI_API_KEY", "SUPABASE_SERVICE_KEY")
URL_VARIABLES = ("DATABASE_URL", "REDIS_URL", "GEMINI_BASE_URL", "DOCUMENTS_URL")
_REDACTED = "***"


@dataclass(frozen=True)
class ModelLimit:
    """A model's own quota, from ``GEMINI_MODEL_LIMITS``."""

    rpm: int
    tpm: int


@dataclass(frozen=True)
class Settings:
    """Everything the runtime can be told through its environment."""

    database_url: str | None = None
    redis_url: str | None = None
    redis_namespace: str = "gemini"
    database_statement_cache_size: int = 100

    gemini_api_key: str | None = None
    gemini_base_url: str | None = None
    gemini_rpm_limit: int = 2000
    gemini_tpm_limit: int = 8_000_000
    gemini_safety_factor: float = 0.9
    gemini_window_s: float = 60.0
    gemini_arrival_skew_s: float = 0.5
    gemini_tpm_counts: str = "input"
    gemini_overrun_risk: float = 0.001
    gemini_rpd_limit: int | None = None
    gemini_lane_shares: Mapping[str, float] = field(default_factory=dict)
    gemini_model_limits: Mapping[str, ModelLimit] = field(default_factory=dict)
    gemini_max_inflight: int = 16
    gemini_timeout_s: float = 300.0
    gemini_model_index: str = "gemini-2.5-pro"
    gemini_model_acte: str = "gemini-2.5-flash"
    gemini_model_boost: str = "gemini-2.5-pro"

    worker_types: tuple[str, ...] = DOCUMENT_TYPES
    worker_concurrency: int = 4
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    worker_drain_s: float = 60.0
    job_lease_s: float = 60.0
    poll_interval_s: float = 5.0

    documents_url: str | None = None
    supabase_service_key: str | None = None
    documents_max_bytes: int = 200 * 1024 * 1024
    index_max_pages: int = 60

    metrics_port: int | None = None
    monitor_alert_at: float = 0.8
    log_format: str = "json"
    log_level: str = "info"

    @property
    def rpm_budget(self) -> int:
        """Requests per window the fleet may use: the quota less the safety margin."""
        return max(1, math.floor(self.gemini_rpm_limit * self.gemini_safety_factor))

    @property
    def tpm_budget(self) -> int:
        """Tokens per window the fleet may use: the quota less the safety margin."""
        return max(1, math.floor(self.gemini_tpm_limit * self.gemini_safety_factor))

    def secrets(self) -> list[str]:
        """Values that must never reach a log line or a terminal."""
        found = [v for v in (self.gemini_api_key, self.supabase_service_key) if v]
        for url in (self.database_url, self.redis_url, self.documents_url):
            password = urlsplit(url).password if url else None
            if password:
                found.append(password)
        return found

    def redacted(self) -> dict[str, str]:
        """The effective settings by variable name, safe to print."""
        shown: dict[str, str] = {}
        for spec in _SPECS:
            value: Any = getattr(self, spec.attribute)
            if value is None:
                text = "(unset)"
            elif spec.variable in SECRET_VARIABLES:
                text = "(set, redacted)"
            elif spec.variable in URL_VARIABLES:
                text = redact_url(str(value))
            elif isinstance(value, tuple):
                text = ",".join(value)
            elif isinstance(value, Mapping):
                text = ",".join(f"{k}={_format_mapping_value(v)}" for k, v in value.items())
            else:
                text = str(value)
            shown[spec.variable] = text
        return shown

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate; raise one ConfigurationError naming every bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        for spec in _SPECS:
            raw = env.get(spec.variable)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[spec.attribute] = spec.parse(raw.strip())
            except ValueError as exc:
                problems.append((spec.variable, str(exc)))
        if not problems:
            shares = values.get("gemini_lane_shares", {})
            if sum(shares.values()) > 1.0 + 1e-9:
                problems.append(("GEMINI_LANE_SHARES", "the shares add up to more than 1"))
        if problems:
            raise ConfigurationError(*problems[0], more=tuple(problems[1:]))
        return cls(**values)


def redact_url(url: str) -> str:
    """The URL with any password replaced, so it can be printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:{_REDACTED}@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _format_mapping_value(value: object) -> str:
    if isinstance(value, ModelLimit):
        return f"{value.rpm}/{value.tpm}"
    return str(value)


# --- parsers: each raises ValueError with what the variable accepts -------------------


def _number(
    convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = convert(raw)
        except ValueError:
            raise ValueError(f"expected {expected}, got {raw!r}") from None
        if not accept(value):
            raise ValueError(f"expected {expected}, got {raw!r}")
        return value

    return parse


def _whole(raw: str) -> int:
    return int(raw.replace("_", ""))


_positive_int = _number(_whole, lambda v: v > 0, "a positive whole number")
_non_negative_int = _number(_whole, lambda v: v >= 0, "a whole number >= 0")
_positive_float = _number(
    float, lambda v: math.isfinite(v) and v > 0, "a positive number of seconds"
)
_non_negative_float = _number(
    float, lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0"
)
_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
_risk = _number(float, lambda v: 0 < v < 0.5, "a probability in (0, 0.5)")
_port = _number(_whole, lambda v: 0 < v <= 65535, "a TCP port 1-65535")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or (parts.scheme != "file" and not parts.hostname):
            shown = redact_url(raw)
            raise ValueError(
                f"expected a {' or '.join(s + '://' for s in schemes)} URL, got {shown!r}"
            )
        return raw

    return parse


def _worker_types(raw: str) -> tuple[str, ...]:
    types = tuple(dict.fromkeys(t.strip().lower() for t in raw.split(",") if t.strip()))
    unknown = [t for t in types if t not in DOCUMENT_TYPES]
    if not types or unknown:
        raise ValueError(
            f"expected a comma-separated list of {', '.join(DOCUMENT_TYPES)}, got {raw!r}"
        )
    return types


def _pairs(raw: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"expected {what}, got {raw!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _lane_shares(raw: str) -> dict[str, float]:
    what = "lane=share pairs such as index=0.3,acte=0.7"
    shares = {}
    for name, value in _pairs(raw, what):
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"expected {what}, got {raw!r}") from None
        if not 0 < share <= 1:
            raise ValueError(f"share of lane {name!r} must be in (0, 1], got {value!r}")
        shares[name] = share
    return shares


def _model_limits(raw: str) -> dict[str, ModelLimit]:
    what = "model=RPM/TPM pairs such as gemini-2.5-pro=150/2000000"
    limits = {}
    for name, value in _pairs(raw, what):
        rpm, sep, tpm = value.partition("/")
        try:
            limits[name] = ModelLimit(rpm=_positive_int(rpm), tpm=_positive_int(tpm))
        except ValueError:
            raise ValueError(f"expected {what}, got {raw!r}") from None
        if not sep:
            raise ValueError(f"expected {what}, got {raw!r}")
    return limits


def _text(raw: str) -> str:
    return raw


@dataclass(frozen=True)
class _Spec:
    variable: str
    parse: Callable[[str], Any]
    meaning: str

    @property
    def attribute(self) -> str:
        return self.variable.lower()


_SPECS: tuple[_Spec, ...] = (
    _Spec("DATABASE_URL", _url("postgresql", "postgres"), "Postgres holding extraction_queue"),
    _Spec("DATABASE_STATEMENT_CACHE_SIZE", _non_negative_int, "0 behind a transaction pooler"),
    _Spec("REDIS_URL", _url("redis", "rediss", "unix"), "shared limiter state; unset: one process"),
    _Spec("REDIS_NAMESPACE", _text, "prefix of every limiter key in Redis"),
    _Spec("GEMINI_API_KEY", _text, "Gemini API key"),
    _Spec("GEMINI_BASE_URL", _url("http", "https"), "another Gemini endpoint (the emulator)"),
    _Spec("GEMINI_RPM_LIMIT", _positive_int, "requests per window of the project's quota"),
    _Spec("GEMINI_TPM_LIMIT", _positive_int, "tokens per window of the project's quota"),
    _Spec("GEMINI_SAFETY_FACTOR", _fraction, "fraction of the quota the fleet may use"),
    _Spec("GEMINI_WINDOW_S", _positive_float, "length of the quota window in seconds"),
    _Spec("GEMINI_ARRIVAL_SKEW_S", _non_negative_float, "spread of request arrival delays"),
    _Spec("GEMINI_TPM_COUNTS", _choice("input", "total"), "which tokens the TPM quota counts"),
    _Spec(
        "GEMINI_OVERRUN_RISK",
        _risk,
        "accepted chance that a window's actual tokens pass the quota (estimates are guesses)",
    ),
    _Spec("GEMINI_RPD_LIMIT", _positive_int, "requests per day of the quota (optional)"),
    _Spec("GEMINI_LANE_SHARES", _lane_shares, "guaranteed share of the budget per lane"),
    _Spec("GEMINI_MODEL_LIMITS", _model_limits, "models with a quota of their own"),
    _Spec("GEMINI_MAX_INFLIGHT", _positive_int, "Gemini calls in flight per process"),
    _Spec("GEMINI_TIMEOUT_S", _positive_float, "timeout of one Gemini call"),
    _Spec("GEMINI_MODEL_INDEX", _text, "model of the index pipeline"),
    _Spec("GEMINI_MODEL_ACTE", _text, "model of the acte extraction"),
    _Spec("GEMINI_MODEL_BOOST", _text, "model of the acte boost"),
    _Spec("WORKER_TYPES", _worker_types, "document types this process takes"),
    _Spec("WORKER_CONCURRENCY", _positive_int, "jobs in flight per process"),
    _Spec("WORKER_ID", _text, "name of this process in the queue and the registry"),
    _Spec("WORKER_DRAIN_S", _positive_float, "time in-flight jobs get to finish at shutdown"),
    _Spec("JOB_LEASE_S", _positive_float, "a dead process loses its rows after this long"),
    _Spec("POLL_INTERVAL_S", _positive_float, "pause between claims when the queue is empty"),
    _Spec("DOCUMENTS_URL", _url("file", "http", "https"), "where the PDFs are"),
    _Spec("SUPABASE_SERVICE_KEY", _text, "bearer token for Supabase Storage"),
    _Spec("DOCUMENTS_MAX_BYTES", _positive_int, "largest PDF accepted"),
    _Spec("INDEX_MAX_PAGES", _positive_int, "largest index accepted, in pages"),
    _Spec("METRICS_PORT", _port, "Prometheus endpoint port (unset: none)"),
    _Spec("MONITOR_ALERT_AT", _fraction, "usage fraction that raises an alert"),
    _Spec("LOG_FORMAT", _choice("json", "console"), "log line format"),
    _Spec("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "lowest level logged"),
)


def variables() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, for docs and ``.env.example``."""
    defaults = Settings(worker_id="<host>-<pid>").redacted()
    return [(s.variable, defaults[s.variable], s.meaning) for s in _SPECS]


def env_example() -> str:
    """The text of ``.env.example``: every variable, its default and its meaning."""
    lines = [
        "# Every setting of the OCR runtime with its default. Copy to .env and edit.",
        "# Unset URLs: the demo and `db init` start embedded servers. REDIS_URL unset means",
        "# an in-process limiter, safe for ONE worker process only.",
    ]
    for variable, default, meaning in variables():
        lines.append(f"\n# {meaning}")
        if default.startswith("<"):
            lines.append(f"# {variable}={default}")
        else:
            lines.append(f"{variable}={'' if default == '(unset)' else default}")
    return "\n".join(lines) + "\n"
