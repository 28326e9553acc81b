"""Backbones for feature extraction: any timm model by name, optionally with our weights.

Models are built and weights loaded by :func:`pathflow.models.weights.load_backbone` (the one
public loader: ``pathflow.models.backbones.create_backbone``, any timm name or ``resnet50_trunc``;
``--weights`` is a ``.safetensors`` export of ``pathflow train``, one of its checkpoints, a
DINO-style checkpoint (teacher backbone) or a plain state dict; keys must match the model
exactly, classifier heads aside). :func:`load_extractor` wraps the module frozen on a device
with how to feed it: inputs are resized to the model's input size (timm ``pretrained_cfg`` or
``image_size``) and normalised as :func:`resolve_norm` decides (``norm="auto"``: the model's
own mean/std when it has one, ImageNet's otherwise).

Example:
    >>> from pathflow.extract.model import load_extractor
    >>> bb = load_extractor("test_vit", device="cpu")  # doctest: +SKIP
    >>> bb.embed_dim, bb.image_size  # doctest: +SKIP
    (64, 160)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathflow.choices import INFERENCE_PRECISIONS, NORM_MODES
from pathflow.exceptions import ConfigError, PathflowError

log = logging.getLogger("pathflow.extract")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: HIPT's inference normalisation (mean = std = 0.5), ``--norm hipt``.
HIPT_MEAN = HIPT_STD = (0.5, 0.5, 0.5)

#: Values of ``norm`` (``--norm``) and ``precision`` (``--precision``).
NORMS = NORM_MODES
PRECISIONS = INFERENCE_PRECISIONS

Triple = tuple[float, float, float]


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
    mean: Triple
    std: Triple
    device: Any
    weights_sha256: str | None = None
    norm_source: str = "imagenet"
    precision: str = "auto"
    #: compiled with static shapes: the embedder pads short batches to one size
    compiled: bool = False

    @property
    def autocast(self) -> bool:
        """bf16 autocast: ``precision`` bf16, or auto on CUDA (features are returned as
        float32 anyway)."""
        if self.precision == "auto":
            return bool(self.device.type == "cuda")
        return self.precision == "bf16"

    def attrs(self) -> dict[str, Any]:
        """What goes into the attrs of every features file (None values are left out)."""
        return {
            "arch": self.arch,
            "weights": self.weights or ("timm-pretrained" if self.pretrained else "random-init"),
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "norm": self.norm_source,
            "precision": "bf16" if self.autocast else "fp32",
        }

    def forward(self, x: Any) -> Any:
        """(B, 3, S, S) normalised float -> (B, D) float32 features."""
        import torch

        with torch.inference_mode():
            if self.autocast:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    y = self.module(x)
            else:
                y = self.module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            if y.ndim != 2:
                y = y.flatten(1)
            return y.float()


def resolve_norm(
    norm: str,
    pretrained_cfg: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    weights_norm: tuple[Triple, Triple] | None = None,
    fallback: str = "imagenet",
) -> tuple[Triple, Triple, str]:
    """``(mean, std, source)`` to normalise inputs with; ``source`` is ``"weights"``,
    ``"pretrained_cfg"``, ``"imagenet"`` or ``"hipt"``.

    * ``"imagenet"``: ImageNet's mean/std; ``"hipt"``: HIPT's inference normalisation,
      mean = std = 0.5;
    * ``"model"``: the model's own: recorded in the weights file (``weights_norm``), else
      timm's ``pretrained_cfg``, else ImageNet's;
    * ``"auto"``: the model's own when it has one, i.e. the weights record one, or the model
      carries timm's pretrained weights (``pretrained``) and so expects its ``pretrained_cfg``
      normalisation (CLIP's, inception-style 0.5...); otherwise ``fallback``'s: ImageNet's
      (random initialisation, or weights trained with pathflow's ImageNet default), or HIPT's
      for HIPT's region features (its published weights record no normalisation).

    Example:
        >>> resolve_norm("auto", {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}, True)
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 'pretrained_cfg')
        >>> resolve_norm("auto", {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})[2]
        'imagenet'
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "hipt" or (norm == "auto" and fallback == "hipt" and weights_norm is None
                          and not pretrained):  # fmt: skip
        return HIPT_MEAN, HIPT_STD, "hipt"
    if norm != "imagenet":
        if weights_norm is not None:
            return weights_norm[0], weights_norm[1], "weights"
        cfg = pretrained_cfg or {}
        if (norm == "model" or pretrained) and cfg.get("mean") and cfg.get("std"):
            return _triple(cfg["mean"]), _triple(cfg["std"]), "pretrained_cfg"
    return IMAGENET_MEAN, IMAGENET_STD, "imagenet"


def _triple(v: Any) -> Triple:
    t = tuple(float(x) for x in v)
    if len(t) == 1:
        t = t * 3
    if len(t) != 3:
        raise ConfigError(f"expected 3 channel values, got {v!r}")
    return t[0], t[1], t[2]


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


def load_extractor(
    arch: str,
    weights: str | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    norm: str = "auto",
    device: str = "auto",
    seed: int = 0,
    weights_sha256: str | None = None,
    norm_fallback: str = "imagenet",
    precision: str = "auto",
    compile: bool | None = None,
) -> Backbone:
    """Create ``arch`` with its weights (:func:`pathflow.models.load_backbone`), frozen in eval
    mode on ``device``. Random initialisation (no weights) is seeded. ``weights_sha256``: the
    weights file's digest if the caller has it (else computed here), recorded in the attrs.
    ``norm_fallback``: see :func:`resolve_norm`. ``precision``: ``auto`` (bf16 autocast on
    CUDA), ``fp32`` or ``bf16`` (also on CPUs with native bf16 matrix units). ``compile``:
    ``torch.compile`` the module (default: on CUDA)."""
    import timm
    import torch

    from pathflow.models.backbones import CUSTOM_BACKBONES
    from pathflow.models.weights import ArchMismatchError, load_backbone, weights_normalization
    from pathflow.outputs import sha256_file

    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"{weights}: weights file not found")
    if not timm.is_model(arch) and arch not in CUSTOM_BACKBONES:
        raise ConfigError(f"unknown backbone {arch!r} (not a timm model name)")
    state = read_state_dict(weights) if weights is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = load_backbone(arch, state, pretrained=pretrained)
        except ArchMismatchError as exc:
            raise WeightsError(f"{weights}: the weights file looks like {exc.family} (keys "
                               f"{', '.join(exc.keys)}) but --arch is {arch}") from exc  # fmt: skip
        except PathflowError as exc:  # the state dict does not fit
            raise WeightsError(f"{weights}: {exc}") from exc
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot create backbone {arch!r}: {first}") from exc
    embed_dim = int(getattr(module, "num_features", 0))
    if embed_dim <= 0:
        raise ConfigError(f"{arch}: the model has no num_features (feature dimension)")
    cfg = dict(getattr(module, "pretrained_cfg", None) or {})
    size = int(image_size or (cfg.get("input_size") or (3, 224, 224))[-1])
    weights_norm = None
    if weights is not None:
        try:
            weights_norm = weights_normalization(weights)
        except PathflowError as exc:
            raise WeightsError(str(exc)) from exc
        if weights_sha256 is None:
            weights_sha256 = sha256_file(weights)
    mean, std, source = resolve_norm(norm, cfg, pretrained, weights_norm, norm_fallback)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    module = module.to(dev).eval()  # CNNs are channels-last already (create_backbone)
    for p in module.parameters():
        p.requires_grad_(False)
    compiled = bool(compile if compile is not None else dev.type == "cuda")
    if compiled:
        module.compile(dynamic=False)
    log.info("backbone %s (%d-d, %d px) on %s, weights %s, mean/std %s (%s)",
             arch, embed_dim, size, dev, weights, mean, source)  # fmt: skip
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
        weights_sha256=weights_sha256,
        norm_source=source,
        precision=precision,
        compiled=compiled,
    )


def read_state_dict(path: str) -> dict[str, Any]:
    """Backbone state dict of a weights file (``pathflow.models.weights.load_backbone_state``:
    our exports and checkpoints, DINO-style ``teacher``/``student`` dicts, plain state dicts;
    ``module.``/``_orig_mod.``/``backbone.`` prefixes removed)."""
    from pathflow.models.weights import load_backbone_state

    try:
        return dict(load_backbone_state(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: cannot read weights ({first})") from exc
