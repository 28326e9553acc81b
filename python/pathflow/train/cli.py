"""``pathflow train``: argument parser (built from :class:`TrainConfig`'s fields and each
registered method's config dataclass) and command.

Shared options are ``--name``; a method's own options are ``--METHOD.NAME`` in a help group
of their own (``--dino.out-dim 4096``), the same names as the method's YAML section. The
method choices come from the registry (``list_methods()``), so a registered method reaches
the command line with no other edit. Building this parser imports torch (the methods are
``nn.Module`` s); ``pathflow`` builds it only for ``pathflow train``.

Example:
    >>> import argparse
    >>> from pathflow.train.cli import add_train_parser
    >>> sub = argparse.ArgumentParser().add_subparsers(dest="command")
    >>> p = add_train_parser(sub)
    >>> ns = p.parse_args(["--method", "simclr", "--data", "run", "--simclr.temperature", "0.2"])
    >>> ns.method, ns.data, vars(ns)["simclr.temperature"]
    ('simclr', 'run', 0.2)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pathflow.config import YamlConfig
from pathflow.options import add_fields
from pathflow.train.config import POSITIVES, PRECISIONS, TrainConfig

_S = argparse.SUPPRESS

#: Fields filled at run time or given as method sections, not plain flags.
_NOT_FLAGS = ("steps_per_epoch", "world_size", "options")

_GROUPS = {
    "method": "what to train",
    "epochs": "length and optimisation",
    "views": "views (pathflow.data presets)",
    "device": "run",
}

_METAVARS: dict[Any, str] = {int: "N", float: "X", str: "NAME", "data": "DIR", "out": "DIR"}

DESCRIPTION = (
    "Self-supervised training of any timm backbone on the WebDataset shards of "
    "pathflow tile --shards. Writes OUT/config.yaml (resolved), checkpoint.pt (atomic; "
    "--resume continues it exactly), metrics.jsonl/.csv, tb/ (TensorBoard), "
    "backbone.safetensors (timm weights) and summary.json. Every option can also be set "
    "in a YAML file (--config) under its long name with underscores, a method's own options "
    "in a section named after the method (dino: {out_dim: 4096}); the command line wins. "
    "For several processes: torchrun --nproc-per-node N -m pathflow train ..."
)
HELP = "self-supervised training (DINO, SimCLR, ...) of a timm backbone on shards"


def _add_fields(
    group: Any,
    cls: type[YamlConfig],
    *,
    prefix: str = "",
    groups: dict[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    choices: dict[str, list[str]] | None = None,
) -> None:
    """One flag per dataclass field: ``--[prefix.]name-with-dashes``, typed; booleans get
    ``--no-`` twins; lists take several values (:func:`pathflow.options.add_fields`)."""
    add_fields(
        group,
        cls,
        prefix=prefix,
        skip=_NOT_FLAGS,
        show_defaults=True,
        sections=groups if parser is not None else None,
        choices=choices,
        listed=("method",),  # checked by the registry: a one-line error with close matches
        metavars=_METAVARS,
    )


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the full ``train`` sub-command to an ``add_subparsers()`` object."""
    from pathflow.data.backends import list_loader_backends
    from pathflow.train.methods import list_methods, method_class

    p = sub.add_parser("train", help=HELP, description=DESCRIPTION)
    methods = list_methods()
    choices = {
        "method": methods,
        "precision": list(PRECISIONS),
        "loader_backend": ["auto", *list_loader_backends()],
        "positives": list(POSITIVES),
        "signal_checkpoint": ["USR1", "USR2", "TERM", "INT", "HUP", "none"],
    }
    _add_fields(p, TrainConfig, groups=_GROUPS, parser=p, choices=choices)
    for name in methods:
        opts = method_class(name).config_class
        recipe = ", ".join(f"{k} {v}" for k, v in opts.recipe.items())
        g = p.add_argument_group(
            f"{name} options (YAML section {name}:)",
            f"defaults of the shared options with --method {name}: {recipe}" if recipe else None,
        )
        _add_fields(g, opts, prefix=name)
    r = p.add_argument_group("options")
    r.add_argument("--config", help="YAML file with options")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def add_train_stub(sub: Any) -> argparse.ArgumentParser:
    """``train`` in the command list without building its options (no torch import): used
    when another command runs, so ``pathflow tile --help`` stays fast."""
    return sub.add_parser("train", help=HELP, add_help=False)


def run_train(ns: argparse.Namespace) -> int:
    """Run the ``train`` command for parsed arguments; returns the exit status."""
    from pathflow.commands.errors import report
    from pathflow.exceptions import PathflowError

    skip = {"command", "config", "quiet", "verbose", "version"}
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    from pathflow.train.preemption import EXIT_INTERRUPTED, EXIT_STOPPED

    try:
        from_yaml = TrainConfig.from_yaml(ns.config) if ns.config else {}
        cfg = TrainConfig.build(from_yaml, values)
        from pathflow.train.trainer import train

        summary = train(cfg, progress=False if ns.quiet else None)
        if summary.stopped_by:  # checkpointed on --signal-checkpoint or Ctrl-C: --resume
            # --signal-checkpoint INT: Ctrl-C is the requeue signal, 75 like the others
            requeue_int = cfg.signal_checkpoint.upper() in ("INT", "SIGINT")
            ctrl_c = summary.stopped_by == "SIGINT" and not requeue_int
            return EXIT_INTERRUPTED if ctrl_c else EXIT_STOPPED
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        ckpt = Path(str(values.get("out") or ".")) / "checkpoint.pt"
        kept = (
            f"{ckpt} holds the last saved step (run the same command with --resume)"
            if ckpt.is_file()
            else "no checkpoint was written"
        )
        print(f"pathflow train: interrupted (SIGINT): stopped at once; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (PathflowError, ValueError, OSError, ImportError) as exc:
        return report("train", exc)
    return 0


__all__ = ["add_train_parser", "add_train_stub", "run_train"]
