"""Job array partitions: disjoint, covering, stable, and ``--part auto`` from array env vars."""

from __future__ import annotations

import pytest
from pathflow.exceptions import ConfigError
from pathflow.jobs.partition import format_part, parse_part, part_of, select

IDS = [f"TCGA-{i:02d}-{j:04d}" for i in range(10) for j in range(100)]  # 1000 slide ids


def test_part_of_is_pinned_blake2b_little_endian() -> None:
    # blake2b(b"TCGA-A1-0001", digest_size=8) = 7bf5587c223288a7 (hex, bytes in order), read
    # little-endian: 0xa78832227c58f57b = 12071953924863096187. Pinned so every machine and
    # every future version assigns a slide to the same part.
    value = 0xA78832227C58F57B
    assert value == 12071953924863096187
    for n in (1, 2, 3, 4, 7, 1000, 2**40):
        assert part_of("TCGA-A1-0001", n) == value % n
    assert part_of("TCGA-A1-0001", 4) == 3


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_parts_are_disjoint_covering_and_balanced(n: int) -> None:
    parts = [select(IDS, IDS, (i, n)) for i in range(n)]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == sorted(IDS)  # covering, and no id twice (disjoint)
    assert len(set(flat)) == len(flat)
    expected = len(IDS) / n
    for p in parts:  # binomial: 4.5 sigma bounds, deterministic ids
        sigma = (len(IDS) * (1 / n) * (1 - 1 / n)) ** 0.5
        assert abs(len(p) - expected) <= 4.5 * sigma + 1
        assert p == [s for s in IDS if s in set(p)]  # order kept


def test_adding_slides_never_moves_a_slide() -> None:
    old = IDS[:500]
    new = IDS[:500] + [f"NEW-{k}" for k in range(300)]
    for i in range(5):
        before = set(select(old, old, (i, 5)))
        after = set(select(new, new, (i, 5)))
        assert before == after & set(old)


def test_select_returns_items_by_key() -> None:
    items = [f"/data/{s}.svs" for s in IDS[:50]]
    got = select(items, IDS[:50], (1, 3))
    assert got == [f"/data/{s}.svs" for s in IDS[:50] if part_of(s, 3) == 1]


def test_parse_explicit_parts() -> None:
    assert parse_part("2/8") == (2, 8)
    assert parse_part(" 0 / 1 ") == (0, 1)
    assert format_part((2, 8)) == "part-0002-of-0008"
    for bad, needle in (("8/8", "0..7"), ("1/0", ">= 1"), ("a/b", "I/N"), ("-1/3", "I/N"),
                        ("3", "I/N")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            parse_part(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
        # sbatch --array=1-8: ids 1..8 -> parts 0..7
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"},
            (2, 8),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            (0, 3),
        ),
        ({"PBS_ARRAY_INDEX": "5", "PATHFLOW_PART_COUNT": "6"}, (5, 6)),
        ({"PBS_ARRAYID": "1", "PATHFLOW_PART_COUNT": "2"}, (1, 2)),
        ({"LSB_JOBINDEX": "1", "LSB_JOBINDEX_END": "5"}, (0, 5)),  # LSF is 1-based
        ({"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "5"}, (4, 5)),
        ({"JOB_COMPLETION_INDEX": "2", "PATHFLOW_PART_COUNT": "3"}, (2, 3)),
        # explicit count/minimum override what the scheduler says
        (
            {"SLURM_ARRAY_TASK_ID": "10", "PATHFLOW_PART_MIN": "10", "PATHFLOW_PART_COUNT": "2"},
            (0, 2),
        ),
    ],
)
def test_auto_reads_array_variables(env: dict[str, str], want: tuple[int, int]) -> None:
    assert parse_part("auto", env) == want


def test_auto_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("PBS_ARRAY_INDEX", "PBS_ARRAYID", "LSB_JOBINDEX", "JOB_COMPLETION_INDEX",
              "PATHFLOW_PART_COUNT", "PATHFLOW_PART_MIN", "SLURM_ARRAY_TASK_MIN",
              "SLURM_ARRAY_TASK_MAX"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert parse_part("auto") == (1, 3)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "SLURM_ARRAY_TASK_ID, PBS_ARRAY_INDEX, LSB_JOBINDEX or JOB_COMPLETION_INDEX"),
        ({"LSB_JOBINDEX": "0"}, "no array-job index"),  # LSF outside an array
        ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT or PATHFLOW_PART_COUNT"),
        ({"PBS_ARRAY_INDEX": "2"}, "PATHFLOW_PART_COUNT"),
        ({"JOB_COMPLETION_INDEX": "0"}, "PATHFLOW_PART_COUNT"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not an integer"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "index must be in 0..3"),
    ],
)
def test_auto_errors_are_one_line_and_name_what_is_missing(
    env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_part("auto", env)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
