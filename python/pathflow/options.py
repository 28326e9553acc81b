"""Command-line options declared on config dataclasses, and the parser built from them.

A field's ``metadata`` (written with :func:`opt`) holds its help text and, where argparse
needs more than the type, its aliases, choices, group, or that it is positional. The flag is
always ``--name-with-dashes``, the same name as the YAML key (dashes or underscores), so the
two cannot drift apart.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> from pathflow.options import add_fields, opt
    >>> @dataclass
    ... class Opts:
    ...     size: int = field(default=8, metadata=opt("side in pixels", flags=("-s",)))
    ...     fast: bool = field(default=False, metadata=opt("go fast"))
    >>> p = argparse.ArgumentParser()
    >>> add_fields(p, Opts)
    >>> vars(p.parse_args(["-s", "4", "--no-fast"]))
    {'size': 4, 'fast': False}
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pathflow.config import is_list, scalar_type

S = argparse.SUPPRESS


def opt(
    help: str = "",
    *,
    flags: Sequence[str] = (),
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    positional: str | None = None,
    type: Callable[[str], Any] | None = None,
    append: bool = False,
) -> dict[str, Any]:
    """The command-line description of a dataclass field, as its ``metadata``:
    ``field(default=8, metadata=opt("side in pixels"))``.

    ``flags``: more names of the option (``-o``, an old ``--long-name``; old long names are
    also accepted as YAML keys); ``choices``: the allowed values (a constant of
    :mod:`pathflow.choices`); ``group``: the help section; ``positional``: the ``nargs`` of
    a positional argument (``"*"``, ``"?"``, or ``"1"`` for exactly one); ``type``: an
    argparse converter of one word into the whole value (``"0.5,1"`` -> a list);
    ``append``: a repeatable option (``--sample A --sample B``)."""
    return {"help": help, "flags": tuple(flags), "choices": choices, "metavar": metavar,
            "group": group, "positional": positional, "type": type, "append": append}  # fmt: skip


def cli_fields(cls: type, skip: Iterable[str] = ()) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` that are command-line options (not private, not ``skip``)."""
    skipped = set(skip)
    return [
        f for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name not in skipped
    ]


def aliases(cls: type) -> dict[str, str]:
    """Old long names (``--weights-256``) -> field name, for YAML keys."""
    out: dict[str, str] = {}
    for f in cli_fields(cls):
        for flag in f.metadata.get("flags", ()):
            if flag.startswith("--"):
                out[flag[2:].replace("-", "_")] = f.name
    return out


def _default_text(f: dataclasses.Field[Any]) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    return "" if default in (None, "") else f" (default {default})"


def add_fields(
    parser: Any,
    cls: type,
    *,
    prefix: str = "",
    skip: Iterable[str] = (),
    show_defaults: bool = False,
    groups: dict[str, Any] | None = None,
    sections: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    listed: Iterable[str] = (),
    metavars: Mapping[Any, str] | None = None,
) -> None:
    """One argparse option per field of the dataclass ``cls``: ``--name-with-dashes``, typed
    from the annotation, ``default`` left out of the namespace (argparse.SUPPRESS) so that
    only what the user typed overrides the YAML file. Booleans get a hidden ``--no-`` twin;
    lists take several values.

    ``prefix``: options ``--PREFIX.name`` with dest ``PREFIX.name`` (a method's own options
    in ``pathflow train``); ``show_defaults``: append ``(default X)`` to each help text;
    ``groups``: help groups by title (shared between calls; a field's ``group`` metadata
    picks one); ``sections``: field name -> title of a help group that starts at that field;
    ``choices``: allowed values by field name (over the metadata's); ``listed``: fields
    whose choices are shown but checked later (a registry's one-line error with close
    matches); ``metavars``: metavar by field name, else by type."""
    types_ = typing.get_type_hints(cls)
    groups = {} if groups is None else groups
    choices = choices or {}
    current = parser
    pre = f"{prefix}." if prefix else ""
    for f in cli_fields(cls, skip):
        m = f.metadata
        if sections and f.name in sections:
            current = parser.add_argument_group(sections[f.name])
        title = m.get("group")
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title] if title else current
        kind = scalar_type(types_[f.name])
        text = m.get("help", "")
        metavar = m.get("metavar")
        if m.get("positional"):
            nargs = None if m["positional"] == "1" else m["positional"]
            text += _default_text(f) if show_defaults else ""
            target.add_argument(f.name, nargs=nargs, default=S, metavar=metavar, help=text)
            continue
        dash = f.name.replace("_", "-")
        dest = pre + f.name
        names = [f"--{pre}{dash}", *m.get("flags", ())]
        if kind is bool and m.get("type") is None:
            no_flag = f"--{pre}no-{dash}"
            if show_defaults:
                state = "on" if f.default is True else "off" if f.default is False else "auto"
                text = f"{text} (default {state}; {no_flag} to turn off)"
            target.add_argument(*names, dest=dest, action="store_true", default=S, help=text)
            target.add_argument(no_flag, dest=dest, action="store_false", default=S, help=S)
            continue
        allowed = choices.get(f.name, m.get("choices"))
        if allowed is not None and f.name in listed:
            metavar, allowed = "{" + ",".join(allowed) + "}", None
        elif allowed is None and metavar is None and metavars:
            metavar = metavars.get(f.name, metavars.get(kind))
        text += _default_text(f) if show_defaults else ""
        kwargs: dict[str, Any] = {"dest": dest, "default": S, "help": text, "metavar": metavar}
        if allowed is not None:
            kwargs["choices"] = list(allowed)
        if m.get("type") is not None:
            kwargs["type"] = m["type"]
        elif m.get("append"):
            kwargs.update(action="append", type=kind)
        else:
            kwargs.update(type=kind, nargs="+" if is_list(types_[f.name]) else None)
        target.add_argument(*names, **kwargs)


def float_list(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` (argparse type of comma-separated numbers)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


__all__ = ["add_fields", "aliases", "cli_fields", "float_list", "opt"]
