"""``pathflow eval slide-knn``: ``run(cfg)`` of the command (its options are
:class:`pathflow.evaluate.config.SlideKnnConfig`, its registration line is in
:mod:`pathflow.commands.builtin`; the work is in :mod:`pathflow.evaluate.slide_knn`)."""

from __future__ import annotations

from pathflow.evaluate.config import FEATURE_CHOICES, SlideKnnConfig


def run(cfg: SlideKnnConfig, quiet: bool = False) -> int:
    """Run the slide-level KNN eval and print its summary."""
    from pathflow.evaluate.slide_knn import run_slide_knn

    print(run_slide_knn(cfg).summary())
    return 0


__all__ = ["FEATURE_CHOICES", "run"]
