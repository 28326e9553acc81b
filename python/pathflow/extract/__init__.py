"""``pathflow extract``: patch features of shards or image folders with any timm backbone.

Example:
    >>> from pathflow.extract import ExtractConfig, run_extract
    >>> cfg = ExtractConfig.build({}, {"inputs": ["pathflow_out"], "arch": "resnet50"})
    >>> run_extract(cfg).ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathflow.extract.config import ExtractConfig
from pathflow.extract.runner import ExtractReport, run_extract
from pathflow.extract.writer import read_features, write_features

__all__ = ["ExtractConfig", "ExtractReport", "read_features", "run_extract", "write_features"]
