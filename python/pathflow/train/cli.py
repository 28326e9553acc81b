"""``pathflow train``: argument parser (built from :class:`TrainConfig`'s fields) and command.

Only argparse and the config dataclass are imported to build the parser; torch and timm load
when the command runs.

Example:
    >>> import argparse
    >>> from pathflow.train.cli import add_train_parser
    >>> sub = argparse.ArgumentParser().add_subparsers(dest="command")
    >>> p = add_train_parser(sub)
    >>> ns = p.parse_args(["--method", "simclr", "--data", "run/shards", "--no-tensorboard"])
    >>> ns.method, ns.data, ns.tensorboard
    ('simclr', 'run/shards', False)
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import fields
from typing import Any

from pathflow.train.config import PRECISIONS, TrainConfig

_S = argparse.SUPPRESS

#: Fields filled at run time, not settable from the command line.
_RUNTIME_FIELDS = ("steps_per_epoch", "world_size")

_GROUPS = {
    "method": "what to train",
    "epochs": "length and optimisation",
    "out_dim": "DINO",
    "temperature": "SimCLR",
    "views": "views (pathflow.data presets)",
    "device": "run",
}

_CHOICES: dict[str, list[str]] = {
    "method": ["dino", "simclr"],
    "precision": list(PRECISIONS),
    "loader_backend": ["auto", "dali", "torch"],
}


_METAVARS: dict[Any, str] = {int: "N", float: "X", str: "NAME", "data": "DIR", "out": "DIR"}


def _scalar_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``bool`` stays ``bool``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "train",
        help="self-supervised training (DINO, SimCLR) of a timm backbone on shards",
        description=(
            "Self-supervised training of any timm backbone on the WebDataset shards of "
            "pathflow tile --shards. Writes OUT/config.yaml (resolved), checkpoint.pt (atomic; "
            "--resume continues it exactly), metrics.jsonl/.csv, tb/ (TensorBoard), "
            "backbone.safetensors (timm weights) and summary.json. Every option can also be set "
            "in a YAML file (--config) under its long name with underscores; the command line "
            "wins. For several processes: torchrun --nproc-per-node N -m pathflow train ..."
        ),
    )
    types_ = TrainConfig.field_types()
    group: Any = p
    for f in fields(TrainConfig):
        if f.name in _RUNTIME_FIELDS:
            continue
        if f.name in _GROUPS:
            group = p.add_argument_group(_GROUPS[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        kind = _scalar_type(types_[f.name])
        if kind is bool:
            no_flag = "--no-" + f.name.replace("_", "-")
            state = "on" if f.default is True else "off" if f.default is False else "auto"
            text = f"{text} (default {state}; {no_flag} to turn off)"
            group.add_argument(flag, dest=f.name, action="store_true", default=_S, help=text)
            group.add_argument(
                no_flag,
                dest=f.name,
                action="store_false",
                default=_S,
                help=argparse.SUPPRESS,
            )
            continue
        default_text = "" if f.default in (None, "") else f" (default {f.default})"
        group.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=_S,
            choices=_CHOICES.get(f.name),
            metavar=None if f.name in _CHOICES else _METAVARS.get(f.name, _METAVARS[kind]),
            help=text + default_text,
        )
    r = p.add_argument_group("options")
    r.add_argument("--config", help="YAML file with options")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def run_train(ns: argparse.Namespace) -> int:
    """Run the ``train`` command for parsed arguments; returns the exit status."""
    from pathflow.exceptions import PathflowError

    skip = {"command", "config", "quiet", "verbose", "version"}
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    try:
        from_yaml = TrainConfig.from_yaml(ns.config) if ns.config else {}
        cfg = TrainConfig.build(from_yaml, values)
        from pathflow.train.trainer import train

        train(cfg, progress=False if ns.quiet else None)
    except (PathflowError, ValueError) as exc:
        print(f"pathflow train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except OSError as exc:
        print(f"pathflow train: error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_train_parser", "run_train"]
