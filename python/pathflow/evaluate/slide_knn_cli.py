"""The ``pathflow eval slide-knn`` command line (kept free of numpy so that building the
CLI parser stays cheap; the work is in :mod:`pathflow.evaluate.slide_knn`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

#: Values of ``--feature``.
FEATURE_CHOICES = ("auto", "cls4k", "mean256", "concat", "features", "region_features")


def add_slide_knn_parser(methods_subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``slide-knn`` sub-command to ``pathflow eval``'s METHOD sub-parsers."""
    text = ("slide-level KNN + logistic regression on mean slide embeddings, stratified "
            "k-fold CV as in HIPT")  # fmt: skip
    m = methods_subparsers.add_parser(
        "slide-knn",
        help=text,
        description=(
            "Average each slide's features (.h5 files of pathflow extract: HIPT cls4k / "
            "mean256 / concat, region_features, or patch features) into one embedding, then "
            "score KNN (k=5, as HIPT) and a logistic-regression probe with stratified k-fold "
            "cross-validation: macro AUC and balanced accuracy, mean ± std over the folds. "
            "Writes metrics.json, metrics.txt, config.yaml and slide_knn.png into --out."
        ),
    )
    S = argparse.SUPPRESS
    a = m.add_argument
    a("inputs", nargs="*", default=S, metavar="FEATURES",
      help="folders of <slide>.h5 features files (or the files)")  # fmt: skip
    a("--labels", default=S, help="CSV with a header holding the slide id and label columns")
    a("--slide-column", default=S, help="slide id column of --labels (default slide)")
    a("--label-column", default=S, help="label column of --labels (default label)")
    a("--feature", choices=list(FEATURE_CHOICES), default=S, metavar="NAME",
      help="dataset to average: auto (default: cls4k, else features, else region_features), "
      "cls4k, mean256, concat, features, region_features")  # fmt: skip
    a("--folds", type=int, default=S, help="stratified cross-validation folds (default 10)")
    a("--k", type=int, default=S, help="KNN neighbours (default 5, scikit-learn's as in HIPT)")
    a("--seed", type=int, default=S, help="fold shuffling seed (default 0)")
    a("--logreg-c", type=float, default=S, help="inverse L2 strength of the probe (default 1)")
    a("--out", "-o", default=S, help="output folder (default pathflow_eval/slide_knn)")
    a("--plot", dest="plot", action="store_true", default=S,
      help="write slide_knn.png (default on; --no-plot)")  # fmt: skip
    a("--no-plot", dest="plot", action="store_false", default=S, help=argparse.SUPPRESS)
    a("--config", help="YAML file with options (long names with underscores)")
    a("--quiet", "-q", action="store_true", help="warnings only")
    a("--verbose", "-v", action="store_true", help="debug logs")
    return m


def cmd_slide_knn(ns: argparse.Namespace) -> int:
    """Run ``pathflow eval slide-knn`` from parsed arguments; print the summary."""
    from pathflow.evaluate.slide_knn import SlideKnnConfig, run_slide_knn
    from pathflow.exceptions import PathflowError

    skip = ("command", "method", "config", "quiet", "verbose", "version")
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    try:
        from_yaml = SlideKnnConfig.from_yaml(ns.config) if getattr(ns, "config", None) else {}
        cfg = SlideKnnConfig.build(from_yaml, values)
        result = run_slide_knn(cfg)
    except (PathflowError, ValueError, OSError, ImportError) as exc:
        msg = " ".join(str(exc).split())
        print(f"pathflow eval slide-knn: error: {msg}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(result.summary())
    return 0


__all__ = ["FEATURE_CHOICES", "add_slide_knn_parser", "cmd_slide_knn"]
