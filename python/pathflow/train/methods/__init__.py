"""Self-supervised methods, one file each, behind a timm-style registry.

Example:
    >>> from pathflow.train.methods import list_methods
    >>> " ".join(list_methods())
    'barlowtwins byol clubyol clusiam dino hipt4k mocov2 mocov3 sgcl simclr simsiam swav'
"""

from __future__ import annotations

from pathflow.train.methods import (  # noqa: F401  (register the methods)
    barlowtwins,
    byol,
    clubyol,
    clusiam,
    dino,
    hipt4k,
    mocov2,
    mocov3,
    sgcl,
    simclr,
    simsiam,
    swav,
)
from pathflow.train.methods.barlowtwins import BarlowTwins, BarlowTwinsConfig
from pathflow.train.methods.base import (
    MethodConfig,
    MultiCropEncoder,
    SSLMethod,
    clip_per_parameter,
    split_decay_groups,
)
from pathflow.train.methods.byol import BYOL, BYOLConfig
from pathflow.train.methods.clubyol import CluBYOL, CluBYOLConfig
from pathflow.train.methods.clusiam import CluSiam, CluSiamConfig
from pathflow.train.methods.dino import DINO, DINOConfig
from pathflow.train.methods.hipt4k import HIPT4K, HIPT4KConfig
from pathflow.train.methods.mocov2 import MoCoV2, MoCoV2Config
from pathflow.train.methods.mocov3 import MoCoV3, MoCoV3Config
from pathflow.train.methods.registry import (
    create_method,
    list_methods,
    method_class,
    register_method,
)
from pathflow.train.methods.sgcl import SGCL, SGCLConfig
from pathflow.train.methods.simclr import SimCLR, SimCLRConfig
from pathflow.train.methods.simsiam import SimSiam, SimSiamConfig
from pathflow.train.methods.swav import SwAV, SwAVConfig

__all__ = [
    "BYOL",
    "DINO",
    "HIPT4K",
    "SGCL",
    "BYOLConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "CluBYOL",
    "CluBYOLConfig",
    "CluSiam",
    "CluSiamConfig",
    "DINOConfig",
    "HIPT4KConfig",
    "MethodConfig",
    "MoCoV2",
    "MoCoV2Config",
    "MoCoV3",
    "MoCoV3Config",
    "MultiCropEncoder",
    "SGCLConfig",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "SwAV",
    "SwAVConfig",
    "clip_per_parameter",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "split_decay_groups",
]
