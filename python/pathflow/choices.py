"""Every fixed choice list of the command line, in one place (no imports: the CLI parser,
the config validators and the help texts read them from here).

Choices that grow by registration are not here: slide readers come from
:func:`pathflow.slide.list_backends`, training methods from
:func:`pathflow.train.methods.list_methods`, evals from :mod:`pathflow.commands`.

Example:
    >>> from pathflow.choices import NORM_MODES, one_of
    >>> one_of(NORM_MODES)
    'auto, model, imagenet or hipt'
"""

from __future__ import annotations

from collections.abc import Sequence

#: ``pathflow tile --preset`` (the tissue defaults of each are ``pathflow.tissue.PRESETS``).
TILE_PRESETS = ("pathflow", "clam", "tcga")
#: Unit of ``--a-t`` / ``--a-h``.
AREA_UNITS = ("mm2", "patch512")
#: ``--mask-mode``.
MASK_MODES = ("intersect", "replace")
#: ``--contour-fn`` (``pathflow.grid.CONTOUR_FNS``).
CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")
#: ``--layout`` of the patch grid.
LAYOUTS = ("slide", "clam")
#: Image encodings of shard samples (``tile --format``, ``extract --patch-format``).
IMAGE_FORMATS = ("jpg", "png", "webp")
#: Native-JPEG pass-through modes (``--transcode``).
TRANSCODE_MODES = ("auto", "always", "never")
#: Where the slides of a job run (``--executor``).
EXECUTORS = ("local", "dask")
#: Input normalisation of a backbone (``--norm``).
NORM_MODES = ("auto", "model", "imagenet", "hipt")
#: Inference precision of extract / eval (``--precision``).
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")
#: Features file formats of ``pathflow extract --format``.
FEATURE_FORMATS = ("h5", "pt")
#: ``pathflow extract --model``.
EXTRACT_MODELS = ("patches", "regions", "hipt")
#: dtype of HIPT region features.
REGION_DTYPES = ("float16", "float32")
#: Training precision (``pathflow train --precision``).
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
#: ``pathflow train --optimizer``.
OPTIMIZERS = ("adamw", "sgd", "lars")
#: Positive pairs of the loaders (``--positives``).
POSITIVES = ("augment", "neighbour", "scale")
#: Tensor types the loaders return (``make_loader(output=...)``).
LOADER_OUTPUTS = ("float", "bfloat16", "uint8")
#: Datasets of a features file averaged by ``pathflow eval slide-knn --feature``.
SLIDE_FEATURES = ("auto", "cls4k", "mean256", "concat", "features", "region_features")


def one_of(choices: Sequence[str]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"`` (for error messages)."""
    items = list(choices)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


__all__ = [
    "AREA_UNITS",
    "CONTOUR_FNS",
    "EXECUTORS",
    "EXTRACT_MODELS",
    "FEATURE_FORMATS",
    "IMAGE_FORMATS",
    "INFERENCE_PRECISIONS",
    "LAYOUTS",
    "LOADER_OUTPUTS",
    "MASK_MODES",
    "NORM_MODES",
    "OPTIMIZERS",
    "POSITIVES",
    "REGION_DTYPES",
    "SLIDE_FEATURES",
    "TILE_PRESETS",
    "TRAIN_PRECISIONS",
    "TRANSCODE_MODES",
    "one_of",
]
