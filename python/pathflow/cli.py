"""Command line of pathflow (``pathflow tile ...``).

Every command is registered in :mod:`pathflow.commands` (a config dataclass whose fields
describe the options, plus ``run(cfg)``); this module builds the parser from the registry
and hands the parsed arguments to the command. Only argparse and the config dataclasses are
imported at start-up; the heavy modules load when a command runs, so ``pathflow tile
--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _command(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return next((a for a in args if not a.startswith("-")), None)


def build_parser(command: str | None = "train") -> argparse.ArgumentParser:
    """The ``pathflow`` parser, one sub-command per registered command. A command with a
    heavy parser of its own (``train``: its options come from the method registry, which
    imports torch) is built in full only when ``command`` names it."""
    from pathflow.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="pathflow", description="Fast data engine for computational pathology."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.add_parser(sub, full=cmd.name == command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command(argv))
    ns = parser.parse_args(argv)
    if ns.version:
        from pathflow import __version__

        print(__version__)
        return 0
    logging.basicConfig(
        level=logging.DEBUG if getattr(ns, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from pathflow.commands import COMMANDS

    if ns.command in COMMANDS:
        return COMMANDS[ns.command](ns)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
