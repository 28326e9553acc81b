"""Old home of backbone creation, kept so ``pathflow.train.backbones`` imports keep working:
the code lives in :mod:`pathflow.models.backbones` (models sit below train, extract and
evaluate).

Example:
    >>> from pathflow.train.backbones import create_backbone
    >>> from pathflow.models.backbones import create_backbone as same
    >>> create_backbone is same
    True
"""

from __future__ import annotations

from pathflow.models.backbones import (
    CUSTOM_BACKBONES,
    backbone_names,
    check_backbone,
    create_backbone,
    is_cnn,
)

__all__ = ["CUSTOM_BACKBONES", "backbone_names", "check_backbone", "create_backbone", "is_cnn"]
