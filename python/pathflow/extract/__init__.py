"""``pathflow extract``: patch features of shards or image folders with any timm backbone.

Example:
    >>> from pathflow.extract import ExtractConfig, run_extract
    >>> cfg = ExtractConfig.build({}, {"inputs": ["pathflow_out"], "arch": "resnet50"})
    >>> run_extract(cfg).ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathflow.extract.config import ExtractConfig
    from pathflow.extract.runner import ExtractReport, run_extract
    from pathflow.extract.writer import read_features, write_features

# Imported on first use, so that the CLI can build its parser without numpy or torch.
_LAZY = {
    "ExtractConfig": "config",
    "ExtractReport": "runner",
    "run_extract": "runner",
    "read_features": "writer",
    "write_features": "writer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pathflow.extract.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pathflow.extract' has no attribute {name!r}")


__all__ = ["ExtractConfig", "ExtractReport", "read_features", "run_extract", "write_features"]
