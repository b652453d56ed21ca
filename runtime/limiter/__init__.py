"""The fleet-wide limiter: every Gemini call of every process within one budget.

``create_limiter`` returns a ``Limiter``; ``acquire`` admits one request and its tokens
(all or nothing, exact in every rolling window, paced), ``Grant.settle`` reconciles the
estimate with the real usage, ``report_rate_limited`` feeds 429s back.
"""

from __future__ import annotations

from runtime.limiter.budget import Budget
from runtime.limiter.errors import DailyQuotaExhausted, RequestTooLarge, StoreUnavailable
from runtime.limiter.grant import Grant, LaneUsage, LimiterStats, Usage
from runtime.limiter.limiter import Admission, Limiter, create_limiter
from runtime.limiter.memory import MemoryRateStore
from runtime.limiter.redis import RedisRateStore
from runtime.limiter.registry import MemoryWorkerRegistry, RedisWorkerRegistry, WorkerRegistry
from runtime.limiter.store import RateStore

__all__ = [
    "Admission",
    "Budget",
    "DailyQuotaExhausted",
    "Grant",
    "LaneUsage",
    "Limiter",
    "LimiterStats",
    "MemoryRateStore",
    "MemoryWorkerRegistry",
    "RateStore",
    "RedisRateStore",
    "RedisWorkerRegistry",
    "RequestTooLarge",
    "StoreUnavailable",
    "Usage",
    "WorkerRegistry",
    "create_limiter",
]
