"""Self-supervised losses (DINO, NT-Xent).

Example:
    >>> from pathflow.train.losses import DINOLoss, NTXentLoss
    >>> NTXentLoss().temperature
    0.1
"""

from __future__ import annotations

from pathflow.train.losses.dino_loss import DINOLoss
from pathflow.train.losses.ntxent_loss import NTXentLoss

__all__ = ["DINOLoss", "NTXentLoss"]
