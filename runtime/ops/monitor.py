"""The fleet at a glance: quota usage, pauses, workers and queue, with alerts.

``python -m runtime monitor`` refreshes a terminal view every second; ``--once`` prints
one snapshot, ``--json`` prints it as JSON, and the exit status is 2 while an alert is
active, so cron jobs and probes can use it too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from runtime.limiter import Limiter, Usage
from runtime.settings import Settings

STATUS_NAMES = {1: "waiting", 2: "scraping", 3: "ready", 4: "failed", 5: "done", 6: "in_ocr"}


@dataclass(frozen=True)
class ModelView:
    model: str
    requests: int
    tokens: int
    rpm_limit: int
    tpm_limit: int
    rpm_budget: int
    tpm_budget: int
    effective_rpm: int
    effective_tpm: int
    factor: float
    paused_for_s: float
    requests_today: int
    lanes: dict[str, dict[str, Any]]

    @property
    def rpm_share(self) -> float:
        return self.requests / max(1, self.rpm_budget)

    @property
    def tpm_share(self) -> float:
        return self.tokens / max(1, self.tpm_budget)


@dataclass
class Snapshot:
    taken_at: str
    window_s: float
    alert_at: float
    models: list[ModelView]
    workers: dict[str, list[str]]
    queue: dict[str, dict[str, int]]
    degraded: bool
    alerts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for view, raw in zip(self.models, data["models"], strict=True):
            raw["rpm_share"] = round(view.rpm_share, 4)
            raw["tpm_share"] = round(view.tpm_share, 4)
        return data


def model_view(
    usage: Usage, settings: Settings, limits: Mapping[str, tuple[int, int]]
) -> ModelView:
    rpm_limit, tpm_limit = limits.get(
        usage.model, (settings.gemini_rpm_limit, settings.gemini_tpm_limit)
    )
    return ModelView(
        model=usage.model,
        requests=usage.requests,
        tokens=usage.tokens,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        rpm_budget=usage.budget.rpm,
        tpm_budget=usage.budget.tpm,
        effective_rpm=usage.effective_rpm,
        effective_tpm=usage.effective_tpm,
        factor=round(usage.factor, 3),
        paused_for_s=round(usage.paused_for_s, 3),
        requests_today=usage.requests_today,
        lanes={
            name: {"requests": lane.requests, "tokens": lane.tokens, "share": lane.share}
            for name, lane in usage.lanes.items()
        },
    )


def alerts_of(snapshot: Snapshot) -> list[str]:
    found = []
    for view in snapshot.models:
        for name, share in (("RPM", view.rpm_share), ("TPM", view.tpm_share)):
            if share >= snapshot.alert_at:
                found.append(
                    f"{view.model}: {name} at {share:.0%} of the budget "
                    f"(alert at {snapshot.alert_at:.0%})"
                )
        if view.paused_for_s > 0:
            found.append(f"{view.model}: paused {view.paused_for_s:.1f} s after a 429")
        if view.factor < 1:
            found.append(f"{view.model}: learned budget at {view.factor:.0%} after 429s")
    if snapshot.degraded:
        found.append("Redis unreachable: limiter state unknown")
    ready = sum(snapshot.queue.get("ready", {}).values())
    if ready and not any(snapshot.workers.values()):
        found.append(f"{ready} documents ready and no live worker")
    return found


async def take_snapshot(
    settings: Settings,
    limiter: Limiter,
    models: list[str],
    queue_depth: Mapping[tuple[int, str], int] | None,
) -> Snapshot:
    limits = {m: (limit.rpm, limit.tpm) for m, limit in settings.gemini_model_limits.items()}
    views = [model_view(await limiter.usage(model=m), settings, limits) for m in models]
    workers = await limiter.live_workers()
    queue: dict[str, dict[str, int]] = {}
    for (status, source), rows in sorted((queue_depth or {}).items()):
        queue.setdefault(STATUS_NAMES.get(status, str(status)), {})[source or "?"] = rows
    snapshot = Snapshot(
        taken_at=datetime.now(UTC).isoformat(timespec="seconds"),
        window_s=settings.gemini_window_s,
        alert_at=settings.monitor_alert_at,
        models=views,
        workers=workers,
        queue=queue,
        degraded=limiter.degraded,
    )
    snapshot.alerts = alerts_of(snapshot)
    return snapshot


def _bar(share: float, alert_at: float) -> ProgressBar:
    style = "red" if share >= alert_at else "green"
    return ProgressBar(total=100, completed=min(100.0, share * 100), width=30, complete_style=style)


def _count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}K"
    return str(value)


def render(snapshot: Snapshot) -> Group:
    usage = Table(title=f"Gemini usage in the rolling {snapshot.window_s:g} s window")
    for column in ("model", "", "used / budget", "%", "effective", "limit", "pause"):
        usage.add_column(column)
    for view in snapshot.models:
        for name, used, budget, effective, limit, share in (
            ("RPM", view.requests, view.rpm_budget, view.effective_rpm, view.rpm_limit,
             view.rpm_share),
            ("TPM", view.tokens, view.tpm_budget, view.effective_tpm, view.tpm_limit,
             view.tpm_share),
        ):  # fmt: skip
            usage.add_row(
                view.model if name == "RPM" else "",
                name,
                f"{_count(used)} / {_count(budget)}",
                Text(f"{share:.0%}", style="red" if share >= snapshot.alert_at else ""),
                _count(effective),
                _count(limit),
                f"{view.paused_for_s:.1f} s" if view.paused_for_s and name == "RPM" else "",
            )
            usage.add_row("", "", _bar(share, snapshot.alert_at), "", "", "", "")
        for lane, figures in view.lanes.items():
            usage.add_row("", f"lane {lane}", f"{figures['requests']} req",
                          _count(int(figures["tokens"])), "", "", "")  # fmt: skip
    workers = Table(title="Live workers")
    workers.add_column("type")
    workers.add_column("count")
    workers.add_column("workers")
    for kind, ids in sorted(snapshot.workers.items()):
        workers.add_row(kind, str(len(ids)), ", ".join(sorted(ids))[:80])
    queue = Table(title="extraction_queue")
    sources = sorted({s for by_source in snapshot.queue.values() for s in by_source})
    queue.add_column("status")
    for source in sources:
        queue.add_column(source)
    for status, by_source in snapshot.queue.items():
        queue.add_row(status, *(str(by_source.get(s, 0)) for s in sources))
    parts: list[Any] = [usage, workers, queue]
    if snapshot.alerts:
        parts.append(Text("\n".join(f"ALERT {a}" for a in snapshot.alerts), style="bold red"))
    else:
        parts.append(Text(f"no alert ({snapshot.taken_at})", style="green"))
    return Group(*parts)


async def sleep_until_next(interval_s: float) -> None:
    await asyncio.sleep(interval_s - math.fmod(time.time(), interval_s))
