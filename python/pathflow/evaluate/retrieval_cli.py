"""The ``pathflow eval retrieval`` command line (kept free of numpy so that building the CLI
parser stays cheap; the work is in :mod:`pathflow.evaluate.retrieval`).

Example:
    pathflow eval retrieval patches/ --arch vit_tiny_patch16_224 --weights w.safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_retrieval_parser(methods_subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``retrieval`` sub-command to ``pathflow eval``'s METHOD sub-parsers."""
    text = "label-free augmentation retrieval: find each image's second view from its first"
    m = methods_subparsers.add_parser(
        "retrieval",
        help=text,
        description=(
            "Make two augmented views of every image under DATA (a views preset, fixed "
            "seed), embed them with the backbone and report the top-1 / top-5 accuracy of "
            "finding each image's second view among all images' second views by cosine "
            "similarity (chance = k / N; ties are credited fractionally). Writes "
            "metrics.json into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = m.add_argument
    a("data", help="folder of images (searched recursively: .jpg, .jpeg, .png)")
    a("--arch", default="vit_small_patch16_224", help="timm model name")
    a("--weights", default=None, help="our .safetensors export or a training checkpoint "
      "(default: none, the seeded random initialisation)")  # fmt: skip
    a("--pretrained", action="store_true", help="load timm's pretrained weights")
    a("--image-size", type=int, default=None, help="view side in pixels (default: the model's)")
    a("--norm", choices=["auto", "model", "imagenet", "hipt"], default="auto",
      help="normalisation, as in pathflow extract")  # fmt: skip
    a("--views", default="simclr", help="views preset: its first two views are used")
    a("--seed", type=int, default=0, help="seed of the views and of a random initialisation")
    a("--max-images", type=int, default=None, help="use the first N images (sorted paths)")
    a("--batch-size", type=int, default=64, help="images per forward pass")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    a("--out", "-o", default="pathflow_eval/retrieval", help="output folder")
    a("--quiet", "-q", action="store_true", help="warnings only")
    a("--verbose", "-v", action="store_true", help="debug logs")
    return m


def cmd_retrieval(ns: argparse.Namespace) -> int:
    """Run ``pathflow eval retrieval`` from parsed arguments; print the summary."""
    from pathflow.evaluate.retrieval import RetrievalConfig, run_retrieval, summary
    from pathflow.exceptions import PathflowError

    fields = RetrievalConfig.__dataclass_fields__
    values = {k: v for k, v in vars(ns).items() if k in fields}
    try:
        report = run_retrieval(RetrievalConfig(**values))
    except (PathflowError, ValueError, OSError, ImportError) as exc:
        msg = " ".join(str(exc).split())
        print(f"pathflow eval retrieval: error: {msg}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(summary(report))
    return 0


__all__ = ["add_retrieval_parser", "cmd_retrieval"]
