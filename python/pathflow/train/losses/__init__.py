"""Self-supervised losses (DINO, NT-Xent, InfoNCE with a queue, negative cosine, SGCL).

Example:
    >>> from pathflow.train.losses import DINOLoss, NTXentLoss
    >>> NTXentLoss().temperature
    0.1
"""

from __future__ import annotations

from pathflow.train.losses.dino_loss import DINOLoss
from pathflow.train.losses.infonce import InfoNCELoss, KeyQueue
from pathflow.train.losses.negative_cosine import BYOLLoss, NegativeCosineLoss
from pathflow.train.losses.ntxent_loss import NTXentLoss
from pathflow.train.losses.sgcl_loss import SpatialMemoryBank, sgcl_terms

__all__ = [
    "BYOLLoss",
    "DINOLoss",
    "InfoNCELoss",
    "KeyQueue",
    "NTXentLoss",
    "NegativeCosineLoss",
    "SpatialMemoryBank",
    "sgcl_terms",
]
