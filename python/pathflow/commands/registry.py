"""The registries of commands and evals, and the one path from parsed flags to ``run(cfg)``.

A command is a config dataclass (fields described with :func:`~pathflow.options.opt`)
plus a function ``run(cfg, quiet=False) -> int | None``, both named by ``"module:attribute"``
so that nothing heavy is imported until the command runs. Its parser is generated from the
dataclass; ``--config FILE`` reads the same names from YAML (the command line wins); every
error goes through :func:`pathflow.commands.errors.report`.

Adding an eval is one module with a config dataclass and ``run`` plus one line:

    register_eval(Command("toy", "my eval", config="mymod:ToyConfig", run="mymod:run"))

Example:
    >>> from pathflow.commands import COMMANDS, EVALS
    >>> list(COMMANDS)
    ['tile', 'train', 'extract', 'eval', 'demo', 'merge', 'status']
    >>> list(EVALS)
    ['knn', 'linear', 'slide-knn', 'retrieval']
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pathflow.commands.errors import report
from pathflow.options import add_fields, aliases

#: Namespace entries that are not config fields.
_NOT_VALUES = ("command", "method", "config", "quiet", "verbose", "version")


def load(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (imports the module)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Command:
    """One ``pathflow`` command (or ``pathflow eval`` method).

    ``loggers``: set to INFO unless ``-q`` / ``-v``; ``fixed``: config values the command
    itself sets (``method`` of ``eval knn``); ``errors``: more exception classes reported as
    failures (exit 1); ``usage_exit``: the exit status of bad input (2; ``merge`` and
    ``status`` keep their 1); ``show_defaults``: append ``(default X)`` to each help text;
    ``parser`` / ``main``: a command with a parser of its own (``train``, whose options come
    from the method registry and import torch): built only when it is the one that runs."""

    name: str
    help: str
    config: str = ""
    run: str = ""
    description: str = ""
    loggers: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    errors: tuple[type[BaseException], ...] = ()
    show_defaults: bool = False
    usage_exit: int = 2
    parser: str = ""
    main: str = ""
    heavy: bool = False

    @property
    def title(self) -> str:
        """The command as typed (``eval knn``), for messages."""
        return f"eval {self.name}" if self.name in EVALS and EVALS[self.name] is self else self.name

    def config_class(self) -> Any:
        return load(self.config)

    def add_parser(self, sub: Any, full: bool = True) -> argparse.ArgumentParser:
        """Add this command to an ``add_subparsers()`` object (``full=False``: its name and
        help only, for a command with its own heavy parser that is not the one running)."""
        if self.parser:
            if full or not self.heavy:
                return load(self.parser)(sub)  # type: ignore[no-any-return]
            return sub.add_parser(self.name, help=self.help, add_help=False)  # type: ignore[no-any-return]
        p = sub.add_parser(self.name, help=self.help, description=self.description or self.help)
        add_fields(p, self.config_class(), skip=self.fixed, show_defaults=self.show_defaults)
        p.add_argument("--config", help="YAML file with options (long names, dashes or "
                       "underscores; the command line wins)")  # fmt: skip
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, warnings only")
        p.add_argument("--verbose", "-v", action="store_true", help="debug logs")
        return p  # type: ignore[no-any-return]

    def build_config(self, ns: argparse.Namespace) -> Any:
        """The config of parsed arguments: defaults <- ``--config`` YAML <- flags."""
        from pathflow.config import read_yaml

        cls = self.config_class()
        values = {k: v for k, v in vars(ns).items() if k not in _NOT_VALUES}
        from_yaml: dict[str, Any] = {}
        if getattr(ns, "config", None):
            renamed = aliases(cls)
            raw = read_yaml(ns.config, cls._section)
            from_yaml = cls.coerce_values(
                {renamed.get(k, k): v for k, v in raw.items()}, str(ns.config)
            )
        return cls.build(from_yaml, {**values, **self.fixed})

    def __call__(self, ns: argparse.Namespace) -> int:
        """Run for parsed arguments; the exit status."""
        if self.main:
            return int(load(self.main)(ns))
        quiet = bool(getattr(ns, "quiet", False))
        if not quiet and not getattr(ns, "verbose", False):
            for name in self.loggers:
                logging.getLogger(name).setLevel(logging.INFO)
        try:
            return run_config(self, self.build_config(ns), quiet=quiet)
        except Exception as exc:
            return report(self.title, exc, self.errors, self.usage_exit)


def find(name: str) -> Command:
    """A registered command by its name as typed: ``"tile"``, ``"eval knn"``."""
    group, _, member = name.partition(" ")
    cmd = COMMANDS[group]
    return cmd.members[member] if isinstance(cmd, Group) else cmd


def run_config(command: Command | str, cfg: Any, quiet: bool = False) -> int:
    """``run(cfg)`` of a command (a :class:`Command` or a registered name: ``"tile"``,
    ``"eval knn"``); exceptions propagate (the library entry point, used by the demo)."""
    cmd = find(command) if isinstance(command, str) else command
    rc = load(cmd.run)(cfg, quiet=quiet)
    return 0 if rc is None else int(rc)


@dataclass(frozen=True)
class Group:
    """A command whose first argument picks a member (``pathflow eval knn``)."""

    name: str
    help: str
    description: str
    members: dict[str, Command]
    dest: str = "method"

    def add_parser(self, sub: Any, full: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(self.name, help=self.help, description=self.description)
        inner = p.add_subparsers(dest=self.dest, metavar=self.dest.upper(), required=True)
        for member in self.members.values():
            member.add_parser(inner)
        return p  # type: ignore[no-any-return]

    def __call__(self, ns: argparse.Namespace) -> int:
        return self.members[getattr(ns, self.dest)](ns)


#: ``pathflow`` commands in help order.
COMMANDS: dict[str, Command | Group] = {}
#: ``pathflow eval`` methods.
EVALS: dict[str, Command] = {}


def register_command(command: Command | Group) -> Command | Group:
    """Add (or replace) a ``pathflow`` command."""
    COMMANDS[command.name] = command
    return command


def register_eval(command: Command) -> Command:
    """Add (or replace) a ``pathflow eval`` method."""
    EVALS[command.name] = command
    return command


__all__ = [
    "COMMANDS",
    "EVALS",
    "Command",
    "Group",
    "find",
    "load",
    "register_command",
    "register_eval",
    "run_config",
]
