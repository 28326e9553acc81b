"""Constants of the job-array tests (imported by their modules and conftest)."""

from __future__ import annotations

#: slide id -> part_of(id, 3): two slides per part
COHORT_PARTS = {"cmu_b": 0, "ink_a": 0, "cmu_d": 1, "slide_d": 1, "cmu_a": 2, "slide_a": 2}

#: small, fast settings shared by every run of the tests
TILE_ARGS = ["--no-overlay", "--slide-mpp", "0.5", "--patch", "128", "--workers", "1", "-q"]
