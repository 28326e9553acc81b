"""HIPT's ViT-4K pretraining (Chen et al., CVPR 2022): DINO over grids of ViT-256 features.

The data are region-feature files of ``pathflow extract --model regions`` (each region a
``[256, 384]`` tensor of ViT-256 [CLS] features, viewed as a ``[384, 16, 16]`` grid), read by
:func:`pathflow.data.features.make_feature_loader`: 2 global crops of 14 x 14 cells and 8
local crops of 6 x 6, each flipped horizontally with probability 0.5, as HIPT's
``DataAugmentationDINO4K`` (no colour augmentation: the inputs are features). The backbone is
``vit4k_xs`` (:mod:`pathflow.models.vit4k`); the student/teacher pair, DINO head, loss, centre,
temperatures, EMA, per-parameter clipping and schedules are :class:`~pathflow.train.methods.
dino.DINO`'s, unchanged. Defaults follow HIPT's ``main_dino4k.py``: teacher temperature 0.04
throughout (no warmup), lr 5e-4 per 256, weight decay 0.04 -> 0.4, clip 3, 10 warmup epochs,
drop path 0.1, momentum 0.996, 65,536 prototypes, the last layer frozen in epoch 1.

Example:
    >>> from pathflow.train import TrainConfig
    >>> cfg = TrainConfig(method="hipt4k", data="out/features", steps=10).resolve()
    >>> cfg.arch, cfg.options.teacher_temp, cfg.options.warmup_teacher_temp_epochs
    ('vit4k_xs', 0.04, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pathflow.train.methods.dino import DINO, DINOConfig
from pathflow.train.methods.registry import register_method
from pathflow.train.plan import h as _h


@dataclass
class HIPT4KConfig(DINOConfig):
    """ViT-4K DINO options (YAML section ``hipt4k:``, flags ``--hipt4k.NAME``); HIPT's
    defaults where they differ from DINO's."""

    recipe: ClassVar[dict[str, Any]] = {**DINOConfig.recipe, "arch": "vit4k_xs"}

    teacher_temp: float = field(default=0.04, metadata=_h("teacher temperature (HIPT 0.04)"))
    warmup_teacher_temp_epochs: float = field(
        default=0.0, metadata=_h("epochs of teacher temperature warmup (HIPT 0)")
    )


@register_method("hipt4k")
class HIPT4K(DINO):
    """DINO with HIPT's ViT-4K defaults over region-feature crops."""

    views_preset = "hipt4k"
    #: the trainer reads region-feature files (not image shards) for this method
    data_kind: ClassVar[str] = "region_features"
    config_class = HIPT4KConfig
