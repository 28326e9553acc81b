"""Options of ``pathflow merge`` and ``pathflow status`` (a job folder of ``tile --part``).

Example:
    >>> from pathflow.jobs.config import MergeConfig
    >>> MergeConfig.build({}, {"job": "run"}).ranks
    8
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pathflow.config import YamlConfig
from pathflow.options import opt


@dataclass
class MergeConfig(YamlConfig):
    """What ``pathflow merge`` combines and checks."""

    _section = "merge"

    job: str = field(
        default="",
        metadata=opt("the job folder (--out of pathflow tile --part)", positional="1"),
    )
    allow_partial: bool = field(default=False, metadata=opt("merge the finished parts only"))
    ranks: int = field(default=8, metadata=opt("training ranks, for the shard-count check"))
    workers: int = field(default=8, metadata=opt("loader workers per rank (same check)"))


@dataclass
class StatusConfig(YamlConfig):
    """The job folder ``pathflow status`` reads."""

    _section = "status"

    job: str = field(default="", metadata=opt("the job folder", positional="1"))


__all__ = ["MergeConfig", "StatusConfig"]
