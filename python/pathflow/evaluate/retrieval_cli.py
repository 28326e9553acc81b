"""``pathflow eval retrieval``: ``run(cfg)`` of the command (its options are
:class:`pathflow.evaluate.config.RetrievalConfig`, its registration line is in
:mod:`pathflow.commands.builtin`; the work is in :mod:`pathflow.evaluate.retrieval`).

Example:
    pathflow eval retrieval patches/ --arch vit_tiny_patch16_224 --weights w.safetensors
"""

from __future__ import annotations

from pathflow.evaluate.config import RetrievalConfig


def run(cfg: RetrievalConfig, quiet: bool = False) -> int:
    """Run the retrieval eval and print its one-line summary."""
    from pathflow.evaluate.retrieval import run_retrieval, summary

    print(summary(run_retrieval(cfg)))
    return 0


__all__ = ["run"]
