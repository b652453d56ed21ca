"""Capacity planning reproduces the design note's tables and follows measured profiles."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from runtime.ops.capacity import (
    Load,
    Quota,
    advise,
    fleet_row,
    largest_fleet,
    reference_table,
    worker_load,
)
from runtime.ops.profiles import SEED_PROFILES, MemoryProfiles, TypeProfile, averages
from runtime.pipelines.common import Profile


def job_profile(*, input_tokens: int, output_tokens: int) -> Profile:
    """An acte twice as heavy and twice as slow as the design note says."""
    return Profile("acte", pages=8, calls=3, retries=0, rate_limited=0,
                   input_tokens=input_tokens, output_tokens=output_tokens,
                   limiter_wait_s=0.0, duration_s=50)  # fmt: skip


SEED_QUOTA = Quota(rpm=2000, tpm=8_000_000, safety_factor=0.8)


def _per_worker(profiles: Mapping[str, TypeProfile] = SEED_PROFILES) -> dict[str, Load]:
    return {source: worker_load(p) for source, p in profiles.items()}


def test_seed_figures_give_the_design_notes_production_table() -> None:
    rows = {row.name: row for row in reference_table(_per_worker(), SEED_QUOTA)}
    production = rows["production"]
    assert production.workers == {"index": 5, "acte": 10}
    assert production.load.rpm == pytest.approx(106, abs=1)
    assert production.load.tpm == pytest.approx(2_690_000, rel=0.01)
    assert production.rpm_share == pytest.approx(0.066, abs=0.002)
    assert production.tpm_share == pytest.approx(0.42, abs=0.005)
    assert rows["maximum safe"].tpm_share == pytest.approx(0.84, abs=0.01)


def test_one_worker_of_each_type_matches_the_note() -> None:
    per_worker = _per_worker()
    assert per_worker["index"].rpm == pytest.approx(6.7, abs=0.05)
    assert per_worker["index"].tpm == pytest.approx(53_700, rel=0.01)
    assert per_worker["acte"].rpm == pytest.approx(7.2)
    assert per_worker["acte"].tpm == pytest.approx(242_400)


async def test_measured_profiles_change_the_table() -> None:
    store = MemoryProfiles()
    for _ in range(10):  # actes twice as heavy and twice as slow as the note says
        await store.record(job_profile(input_tokens=60_000, output_tokens=142_000))
    measured = averages(await store.sums())
    assert measured["acte"].jobs == 10
    assert measured["index"] == SEED_PROFILES["index"]
    per_worker = _per_worker(measured)
    assert per_worker["acte"].tpm == pytest.approx(242_400)  # 2x tokens, 2x slower
    assert per_worker["acte"].rpm == pytest.approx(3.6)
    production = reference_table(per_worker, SEED_QUOTA)[2]
    assert production.load.rpm == pytest.approx(33.3 + 36, abs=0.5)


def test_few_measured_jobs_do_not_replace_the_seed() -> None:
    sums = {"acte": {"jobs": 2, "calls": 6, "duration_s": 1000}}
    assert averages(sums)["acte"] == SEED_PROFILES["acte"]


def test_largest_fleet_stays_under_the_target() -> None:
    fleet = largest_fleet(_per_worker(), SEED_QUOTA, target=0.8, mix={"index": 1, "acte": 2})
    assert fleet.peak_share <= 0.8
    bigger = {k: v + (1 if k == "index" else 2) for k, v in fleet.workers.items()}
    assert fleet_row("next", bigger, _per_worker(), SEED_QUOTA).peak_share > 0.8
    assert fleet.workers == {"index": 9, "acte": 18}


def test_advice_drains_the_queue_within_the_quota() -> None:
    advice = advise(
        queued={"index": 100, "acte": 600},
        live={"index": 2, "acte": 2},
        profiles=SEED_PROFILES,
        per_worker=_per_worker(),
        quota=SEED_QUOTA,
        drain_within_s=3600,
        concurrency=1,
        target=0.8,
    )
    by_type = {a.source: a for a in advice}
    assert by_type["index"].needed == 5  # 100 x 180 s / 3600 s
    assert by_type["acte"].needed == 5  # 600 x 25 s / 3600 s, rounded up
    assert by_type["acte"].change == 3
    assert not by_type["acte"].limited_by_quota

    flooded = advise(
        queued={"index": 0, "acte": 1_000_000},
        live={},
        profiles=SEED_PROFILES,
        per_worker=_per_worker(),
        quota=SEED_QUOTA,
        drain_within_s=3600,
        concurrency=1,
        target=0.8,
    )
    acte = next(a for a in flooded if a.source == "acte")
    assert acte.limited_by_quota
    assert acte.needed * 242_400 <= 0.8 * 6_400_000
