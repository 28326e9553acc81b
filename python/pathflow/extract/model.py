"""Backbones for feature extraction: any timm model by name, optionally with our weights.

``--weights`` takes a ``.safetensors`` export of ``pathflow train``, one of its checkpoints,
a DINO-style checkpoint (teacher backbone) or a plain state dict (read with
``pathflow.train.export.load_backbone_state``); keys must then match the model exactly
(classifier heads aside). Backbones are built with ``pathflow.train.backbones``
(``create_backbone``: any timm name, ``resnet50_trunc``). Inputs are resized to
the model's input size (timm ``pretrained_cfg`` or ``image_size``) and normalised with the
ImageNet mean/std (``norm="model"``: the model's own).

Example:
    >>> from pathflow.extract.model import load_backbone
    >>> bb = load_backbone("test_vit", device="cpu")  # doctest: +SKIP
    >>> bb.embed_dim, bb.image_size  # doctest: +SKIP
    (64, 160)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError, PathflowError

log = logging.getLogger("pathflow.extract")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(PathflowError):
    """A weights file cannot be read or does not fit the architecture."""


@dataclass
class Backbone:
    """A frozen feature extractor in eval mode on ``device`` and how to feed it."""

    module: Any
    arch: str
    weights: str | None
    pretrained: bool
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: Any

    @property
    def autocast(self) -> bool:
        """bf16 autocast on CUDA (features are returned as float32 anyway)."""
        return bool(self.device.type == "cuda")

    def attrs(self) -> dict[str, Any]:
        """What goes into the attrs of every features file."""
        return {
            "arch": self.arch,
            "weights": self.weights or ("timm-pretrained" if self.pretrained else "random-init"),
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def forward(self, x: Any) -> Any:
        """(B, 3, S, S) normalised float -> (B, D) float32 features."""
        import torch

        with torch.inference_mode():
            if self.autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = self.module(x)
            else:
                y = self.module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            if y.ndim != 2:
                y = y.flatten(1)
            return y.float()


def resolve_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_backbone(
    arch: str,
    weights: str | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    norm: str = "imagenet",
    device: str = "auto",
    seed: int = 0,
) -> Backbone:
    """Create ``arch`` (timm name, or one of ``pathflow.train.backbones``), load weights,
    move to ``device`` in eval mode. Random initialisation (no weights) is seeded."""
    import torch

    if norm not in ("imagenet", "model"):
        raise ConfigError(f"norm must be 'imagenet' or 'model', got {norm!r}")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"{weights}: weights file not found")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, embed_dim = _create(arch, pretrained)
    if weights is not None:
        _load_weights(module, weights)
    cfg = dict(getattr(module, "pretrained_cfg", None) or {})
    size = int(image_size or (cfg.get("input_size") or (3, 224, 224))[-1])
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if norm == "model":
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))  # type: ignore[assignment]
        std = tuple(cfg.get("std", IMAGENET_STD))  # type: ignore[assignment]
    dev = resolve_device(device)
    module = module.to(dev).eval()  # CNNs are channels-last already (create_backbone)
    for p in module.parameters():
        p.requires_grad_(False)
    log.info("backbone %s (%d-d, %d px) on %s, weights %s", arch, embed_dim, size, dev, weights)
    return Backbone(
        module=module,
        arch=arch,
        weights=str(Path(weights).resolve()) if weights else None,
        pretrained=pretrained,
        embed_dim=embed_dim,
        image_size=size,
        mean=mean,
        std=std,
        device=dev,
    )


def _create(arch: str, pretrained: bool) -> tuple[Any, int]:
    """``pathflow.train.backbones.create_backbone``: the modules training builds (ViTs with
    ``dynamic_img_size``, so any ``image_size`` works; CNNs channels-last)."""
    import timm

    from pathflow.train.backbones import CUSTOM_BACKBONES, create_backbone

    if not timm.is_model(arch) and arch not in CUSTOM_BACKBONES:
        raise ConfigError(f"unknown backbone {arch!r} (not a timm model name)")
    try:
        module, dim = create_backbone(arch, pretrained=pretrained)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot create backbone {arch!r}: {first}") from exc
    return module, int(dim)


def read_state_dict(path: str) -> dict[str, Any]:
    """Backbone state dict of a weights file (``pathflow.train.export.load_backbone_state``:
    our exports and checkpoints, DINO-style ``teacher``/``student`` dicts, plain state dicts;
    ``module.``/``_orig_mod.``/``backbone.`` prefixes removed)."""
    from pathflow.train.export import load_backbone_state

    try:
        return dict(load_backbone_state(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: cannot read weights ({first})") from exc


def _load_weights(module: Any, path: str) -> None:
    state = read_state_dict(path)
    filt = getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            state = filt(state, module)
        except Exception as exc:
            log.debug("checkpoint_filter_fn failed (%s); loading as is", exc)
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    head = [k for k in unexpected if k.split(".")[0] in ("head", "fc", "classifier", "heads")]
    for k in head:
        del state[k]
    unexpected = [k for k in unexpected if k not in head]
    missing = [k for k in own if k not in state]
    bad_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsError(
            f"{path}: weights do not fit {type(module).__name__}: {'; '.join(parts)}"
        )
    module.load_state_dict(state, strict=True)
