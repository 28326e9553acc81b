"""One mechanism for every ``pathflow`` command: a config dataclass with help metadata plus
``run(cfg)``, a parser generated from the dataclass, registries of commands and evals, and
one error handler (:mod:`pathflow.commands.errors`).

Example:
    >>> from pathflow.commands import COMMANDS, EVALS
    >>> "tile" in COMMANDS and "knn" in EVALS
    True
"""

from __future__ import annotations

from pathflow.commands import builtin as _builtin  # noqa: F401  (registers the built-ins)
from pathflow.commands.errors import exit_code, one_line, report
from pathflow.commands.registry import (
    COMMANDS,
    EVALS,
    Command,
    Group,
    find,
    load,
    register_command,
    register_eval,
    run_config,
)

__all__ = [
    "COMMANDS",
    "EVALS",
    "Command",
    "Group",
    "exit_code",
    "find",
    "load",
    "one_line",
    "register_command",
    "register_eval",
    "report",
    "run_config",
]
