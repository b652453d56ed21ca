"""Capacity planning: how many workers of each type the quota can carry.

From the average job of each type (measured by the fleet, or the design note's figures),
one worker slot running jobs back to back generates calls x 60 / duration requests and
tokens x 60 / duration tokens per minute. Fleet tables, the largest safe fleet and a
drain-the-queue advice follow by arithmetic. Pure functions; the command prints them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.ops.profiles import TypeProfile

# The design note's reference fleets: (index workers, acte workers).
REFERENCE_FLEETS: tuple[tuple[str, int, int], ...] = (
    ("development", 1, 1),
    ("staging", 2, 3),
    ("production", 5, 10),
    ("maximum safe", 10, 20),
)


@dataclass(frozen=True)
class Load:
    """Requests and tokens per minute."""

    rpm: float
    tpm: float

    def __add__(self, other: Load) -> Load:
        return Load(self.rpm + other.rpm, self.tpm + other.tpm)

    def __mul__(self, factor: float) -> Load:
        return Load(self.rpm * factor, self.tpm * factor)


@dataclass(frozen=True)
class Quota:
    """The project's limits per minute, and the fraction the fleet may use."""

    rpm: int
    tpm: int
    safety_factor: float
    tpm_counts: str = "total"

    @property
    def budget(self) -> Load:
        return Load(self.rpm * self.safety_factor, self.tpm * self.safety_factor)


def worker_load(profile: TypeProfile, *, concurrency: int = 1, tpm_counts: str = "total") -> Load:
    """The load of one worker process running ``concurrency`` jobs back to back."""
    jobs_per_minute = 60.0 / profile.duration_s * concurrency
    tokens = profile.input_tokens if tpm_counts == "input" else profile.tokens
    return Load(rpm=profile.calls * jobs_per_minute, tpm=tokens * jobs_per_minute)


@dataclass(frozen=True)
class FleetRow:
    name: str
    workers: Mapping[str, int]
    load: Load
    rpm_share: float  # of the budget
    tpm_share: float

    @property
    def peak_share(self) -> float:
        return max(self.rpm_share, self.tpm_share)


def fleet_row(
    name: str, workers: Mapping[str, int], per_worker: Mapping[str, Load], quota: Quota
) -> FleetRow:
    load = Load(0.0, 0.0)
    for source, count in workers.items():
        load = load + per_worker[source] * count
    budget = quota.budget
    return FleetRow(
        name=name,
        workers=dict(workers),
        load=load,
        rpm_share=load.rpm / budget.rpm,
        tpm_share=load.tpm / budget.tpm,
    )


def reference_table(per_worker: Mapping[str, Load], quota: Quota) -> list[FleetRow]:
    return [
        fleet_row(name, {"index": index, "acte": acte}, per_worker, quota)
        for name, index, acte in REFERENCE_FLEETS
    ]


def largest_fleet(
    per_worker: Mapping[str, Load], quota: Quota, *, target: float, mix: Mapping[str, int]
) -> FleetRow:
    """The largest fleet in the proportions of ``mix`` that stays under ``target`` x budget."""
    unit = fleet_row("unit", mix, per_worker, quota)
    if unit.peak_share == 0:
        raise ValueError("the mix generates no load")
    multiple = math.floor(target / unit.peak_share + 1e-9)
    workers = {source: count * multiple for source, count in mix.items()}
    return fleet_row(f"largest at {target:.0%}", workers, per_worker, quota)


@dataclass(frozen=True)
class Advice:
    source: str
    queued: int
    live: int
    needed: int
    limited_by_quota: bool

    @property
    def change(self) -> int:
        return self.needed - self.live


def advise(
    *,
    queued: Mapping[str, int],
    live: Mapping[str, int],
    profiles: Mapping[str, TypeProfile],
    per_worker: Mapping[str, Load],
    quota: Quota,
    drain_within_s: float,
    concurrency: int,
    target: float,
) -> list[Advice]:
    """Workers of each type to drain the queue in time, capped by the quota's headroom."""
    wanted: dict[str, int] = {}
    for source, profile in profiles.items():
        slots = queued.get(source, 0) * profile.duration_s / drain_within_s
        wanted[source] = math.ceil(slots / concurrency)
    row = fleet_row("wanted", wanted, per_worker, quota)
    scale = 1.0
    if row.peak_share > target:
        scale = target / row.peak_share
    return [
        Advice(
            source=source,
            queued=queued.get(source, 0),
            live=live.get(source, 0),
            needed=math.floor(count * scale) if scale < 1 else count,
            limited_by_quota=scale < 1 and count > 0,
        )
        for source, count in wanted.items()
    ]
