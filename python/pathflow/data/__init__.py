"""pathflow.data: sample slides, and fast SSL loaders over WebDataset shards.

Example:
    >>> from pathflow.data import list_samples, list_views
    >>> "cmu-small" in list_samples(), "dino" in list_views()
    (True, True)
    >>> from pathflow.data import make_loader
    >>> loader = make_loader("out/shards", views="dino", batch_size=64)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     globals_, locals_ = batch.views[:2], batch.views[2:]

The loader needs torch (``pip install 'pathflow[train]'``) and uses NVIDIA DALI when present
(``pathflow[gpu]``); view specs and the shard index need neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pathflow.data.backends import (
    LoaderBackend,
    create_loader_backend,
    list_loader_backends,
    register_loader_backend,
)
from pathflow.data.samples import list_samples, sample_cache_dir, sample_slide
from pathflow.data.shardset import ShardSet, epoch_order
from pathflow.data.sources import data_fingerprint, resolve_data
from pathflow.data.views import (
    StainStats,
    ViewParams,
    ViewSpec,
    ViewsSpec,
    create_views,
    list_views,
    sample_batch_params,
)

if TYPE_CHECKING:
    from pathflow.data.batch import Batch
    from pathflow.data.features import (
        FeatureCropSpec,
        RegionFeatureLoader,
        RegionFeatureSet,
        is_region_feature_folder,
        make_feature_loader,
    )
    from pathflow.data.loader import Loader, make_loader
    from pathflow.data.neighbours import NeighbourIndex
    from pathflow.data.stain import fit_stain_stats

_LAZY = {
    "make_loader": "pathflow.data.loader",
    "Loader": "pathflow.data.loader",
    "Batch": "pathflow.data.batch",
    "NeighbourIndex": "pathflow.data.neighbours",
    "fit_stain_stats": "pathflow.data.stain",
    "make_feature_loader": "pathflow.data.features",
    "RegionFeatureLoader": "pathflow.data.features",
    "RegionFeatureSet": "pathflow.data.features",
    "FeatureCropSpec": "pathflow.data.features",
    "is_region_feature_folder": "pathflow.data.features",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pathflow.data' has no attribute {name!r}")


__all__ = [
    "Batch",
    "FeatureCropSpec",
    "Loader",
    "LoaderBackend",
    "NeighbourIndex",
    "RegionFeatureLoader",
    "RegionFeatureSet",
    "ShardSet",
    "StainStats",
    "ViewParams",
    "ViewSpec",
    "ViewsSpec",
    "create_loader_backend",
    "create_views",
    "data_fingerprint",
    "epoch_order",
    "fit_stain_stats",
    "is_region_feature_folder",
    "list_loader_backends",
    "list_samples",
    "list_views",
    "make_feature_loader",
    "make_loader",
    "register_loader_backend",
    "resolve_data",
    "sample_batch_params",
    "sample_cache_dir",
    "sample_slide",
]
