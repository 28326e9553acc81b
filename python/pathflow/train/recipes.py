"""Named training recipes (``pathflow train --recipe NAME``): a method, its backbone, its
hyper-parameters and pathology views in one name.

The ``lunit-*`` recipes follow the Lunit benchmark (Kang et al., "Benchmarking
Self-Supervised Learning on Diverse Pathology Datasets", CVPR 2023;
github.com/lunit-io/benchmark-ssl-pathology): MoCo v2, SwAV and Barlow Twins on a ResNet-50,
DINO on a ViT-S/16 (the backbones of their released weights), with pathology views (vertical
flips and 90-degree rotations, RandStainNA, weaker colour jitter, no solarisation: the
``pathology`` and ``pathology-dino`` presets of :mod:`pathflow.data.views`). Their
optimisation hyper-parameters are the methods' reference values (MoCo v2, SwAV, Barlow Twins
and DINO's official recipes), written out here so a recipe stays fixed if a method's default
changes; ``SOURCES`` says where each value comes from.

A recipe fills only what the user left unset. Precedence, highest first: command line >
YAML file > ``--recipe`` > the method's own recipe (``MethodConfig.recipe``) >
:class:`~pathflow.train.config.TrainConfig` defaults. A recipe names its method: with
``--recipe`` the method need not be given, and another ``--method`` is an error.

Example:
    >>> from pathflow.train.recipes import get_recipe, list_recipes
    >>> list_recipes()
    ['lunit-barlow', 'lunit-dino', 'lunit-mocov2', 'lunit-swav']
    >>> r = get_recipe("lunit-mocov2")
    >>> r.method, r.fields["arch"], r.fields["views"], r.options["queue_size"]
    ('mocov2', 'resnet50', 'pathology', 65536)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from pathflow.exceptions import ConfigError


@dataclass(frozen=True)
class Recipe:
    """One named recipe: the method, :class:`TrainConfig` field values and method options."""

    name: str
    method: str
    fields: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""


_LUNIT = "Kang et al. CVPR 2023 (lunit-io/benchmark-ssl-pathology)"

#: Where the values come from: ``lunit`` (the Lunit paper/repository: methods, backbones,
#: pathology view techniques), ``reference`` (the method's official recipe, used where the
#: Lunit sources at hand give no value), ``pathflow`` (strengths of pathflow's presets).
SOURCES: dict[str, str] = {
    "method": "lunit",
    "arch": "lunit (ResNet-50 for MoCo v2/SwAV/Barlow Twins, ViT-S/16 for DINO)",
    "views": "lunit techniques (vertical flips, stain augmentation, weaker jitter, no "
    "solarisation); strengths: pathflow presets",
    "optimizer": "reference",
    "lr": "reference",
    "weight_decay": "reference",
    "weight_decay_end": "reference",
    "warmup_epochs": "reference",
    "clip_grad": "reference",
    "drop_path_rate": "reference",
    "num_local": "reference",
    "options": "reference",
}

_RECIPES: dict[str, Recipe] = {
    "lunit-mocov2": Recipe(
        "lunit-mocov2",
        "mocov2",
        {
            "arch": "resnet50",
            "views": "pathology",
            "optimizer": "sgd",
            "lr": 0.03,
            "weight_decay": 1e-4,
            "weight_decay_end": 1e-4,
            "warmup_epochs": 0.0,
            "clip_grad": 0.0,
        },
        {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "proj_dim": 128},
        _LUNIT,
    ),
    "lunit-swav": Recipe(
        "lunit-swav",
        "swav",
        {
            "arch": "resnet50",
            "views": "pathology-dino",
            "num_local": 6,
            "optimizer": "lars",
            "lr": 0.3,
            "weight_decay": 1e-6,
            "weight_decay_end": 1e-6,
            "warmup_epochs": 10.0,
            "clip_grad": 0.0,
        },
        {
            "n_prototypes": 3000,
            "proj_dim": 128,
            "temperature": 0.1,
            "epsilon": 0.05,
            "sinkhorn_iterations": 3,
        },
        _LUNIT,
    ),
    "lunit-barlow": Recipe(
        "lunit-barlow",
        "barlowtwins",
        {
            "arch": "resnet50",
            "views": "pathology",
            "optimizer": "lars",
            "lr": 0.2,
            "weight_decay": 1.5e-6,
            "weight_decay_end": 1.5e-6,
            "warmup_epochs": 10.0,
            "clip_grad": 0.0,
        },
        {"proj_dims": "8192-8192-8192", "lambd": 5e-3},
        _LUNIT,
    ),
    "lunit-dino": Recipe(
        "lunit-dino",
        "dino",
        {
            "arch": "vit_small_patch16_224",
            "views": "pathology-dino",
            "optimizer": "adamw",
            "lr": 5e-4,
            "weight_decay": 0.04,
            "weight_decay_end": 0.4,
            "warmup_epochs": 10.0,
            "clip_grad": 3.0,
            "drop_path_rate": 0.1,
        },
        {
            "out_dim": 65536,
            "momentum_teacher": 0.996,
            "teacher_temp": 0.07,
            "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 30.0,
        },
        _LUNIT,
    ),
}


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; an unknown name is a one-line :class:`ConfigError` naming close
    matches."""
    if name in _RECIPES:
        return _RECIPES[name]
    close = difflib.get_close_matches(name, list_recipes(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown recipe {name!r}; {hint}choose from {', '.join(list_recipes())}")


__all__ = ["SOURCES", "Recipe", "get_recipe", "list_recipes"]
