"""Backbone weights out of training runs: timm-compatible ``.safetensors``, and a loader
for our checkpoints, our exports, official DINO-style checkpoints and plain state dicts.

:func:`export_backbone` writes the backbone's state dict with the keys of the bare timm model
(no ``module.``, ``_orig_mod.``, ``backbone.``, ``teacher.``/``student.`` prefixes, no head),
so timm loads it as pretrained weights::

    model = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="backbone.safetensors"))

timm loads non-strictly when ``num_classes`` differs from the pretrained config's, so
:func:`load_backbone` (strict: every backbone key must match; classifier-head keys are
ignored) is the safer route in code; ``pathflow extract`` and ``pathflow eval`` use it too.
``resnet50_trunc`` (CLAM's truncated ResNet-50) exports the resnet50 keys without
``layer4.*``; load it with ``load_backbone("resnet50_trunc", path)``, or through timm as above
with ``"resnet50"`` and then ``model.layer4 = torch.nn.Identity()`` (1024-d features).

``export_backbone(..., mean=, std=)`` records the input normalisation the backbone was trained
with in the file's metadata (read back by :func:`weights_normalization`; ``pathflow extract``
then normalises with it by default).

``pathflow.train.export`` re-exports this module (its old home).

Example:
    >>> from pathflow.models.weights import export_backbone, load_backbone_state
    >>> export_backbone("run/checkpoint.pt", "run/backbone.safetensors",
    ...                 arch="vit_small_patch16_224")  # doctest: +SKIP
    >>> sd = load_backbone_state("dino_checkpoint.pth")  # official DINO, teacher  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pathflow.exceptions import PathflowError
from pathflow.models.backbones import create_backbone
from pathflow.outputs import atomic_path

log = logging.getLogger("pathflow.models")

#: Containers of a state dict in common checkpoint formats, in order of preference.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "net")


def _strip_wrappers(key: str) -> str:
    """Remove ``_orig_mod.`` (torch.compile) anywhere and leading ``module.`` (DDP)."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _select(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor] | None:
    """Keys under ``prefix``, prefix removed; None if there are none."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return sub or None


def clean_backbone_state(
    checkpoint: Mapping[str, Any], which: str = "teacher", prefix: str | None = None
) -> dict[str, Tensor]:
    """The backbone's state dict out of a checkpoint dict (any supported layout).

    Args:
        checkpoint: our checkpoint (``"method"`` + ``"export_prefix"``), a DINO-style dict
            with ``"teacher"``/``"student"`` state dicts, a dict holding ``state_dict`` /
            ``model``..., or a state dict.
        which: ``"teacher"`` or ``"student"`` where both are present.
        prefix: take the keys under this prefix (after removing wrappers); default: our
            checkpoint's ``export_prefix``, else ``<which>.``, ``backbone.``,
            ``encoder.backbone.`` when present.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    ckpt: Mapping[str, Any] = checkpoint
    if isinstance(ckpt.get("method"), Mapping) and "export_prefix" in ckpt:  # ours
        if prefix is None:
            prefix = str(ckpt["export_prefix"])
            if which == "student" and prefix.startswith("teacher."):
                prefix = "student." + prefix[len("teacher.") :]
        ckpt = ckpt["method"]
    elif isinstance(ckpt.get(which), Mapping):  # DINO / iBOT / DINOv2 style
        ckpt = ckpt[which]
    else:
        for key in _CONTAINER_KEYS:
            if isinstance(ckpt.get(key), Mapping):
                ckpt = ckpt[key]
                break
    state = {_strip_wrappers(k): v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state:
        raise PathflowError("no tensors found in the checkpoint")
    if prefix is not None:
        sub = _select(state, prefix)
        if sub is None:
            raise PathflowError(f"no keys start with {prefix!r} in the checkpoint")
        return sub
    for p in (f"{which}.", "backbone.", "encoder.backbone."):
        sub = _select(state, p)
        if sub is not None:
            state = {_strip_wrappers(k): v for k, v in sub.items()}
    return state


def _checkpoint_globals() -> contextlib.AbstractContextManager[Any]:
    """Let ``weights_only`` loading accept ``argparse.Namespace``: DINO-style training
    checkpoints (facebookresearch/dino, HIPT's published ``vit256_small_dino.pth`` /
    ``vit4k_xs_dino.pth``) store their ``args`` as one, holding plain values only."""
    safe = getattr(torch.serialization, "safe_globals", None)
    return safe([argparse.Namespace]) if safe is not None else contextlib.nullcontext()


def load_backbone_state(
    source: str | os.PathLike[str] | Mapping[str, Any],
    which: str = "teacher",
    weights_only: bool = True,
) -> dict[str, Tensor]:
    """Backbone state dict (timm key names) from a file or a checkpoint dict.

    Accepts our training checkpoints (``checkpoint.pt``), our ``.safetensors`` exports,
    official DINO checkpoints (``{"teacher": {"backbone.*", "head.*"}, "student":
    {"module.backbone.*", ...}}``), DINO's released backbone weights, and timm/lightning
    style ``{"state_dict": ...}`` files (DINO's ``args`` namespace is accepted with
    ``weights_only=True``). ``weights_only=False`` is needed for pickles holding
    other objects (e.g. DINO's ``args`` namespace); use it only on files you trust.

    Example:
        >>> sd = load_backbone_state("dino_vitbase16_pretrain_full_checkpoint.pth",
        ...                          weights_only=False)  # doctest: +SKIP
    """
    if isinstance(source, Mapping):
        return clean_backbone_state(source, which=which)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return clean_backbone_state(load_file(str(path)), which=which)
    try:
        with _checkpoint_globals():
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise PathflowError(
            f"{path}: holds Python objects besides tensors; if you trust the file, load it "
            "with weights_only=False"
        ) from exc
    if not isinstance(ckpt, Mapping):
        raise PathflowError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
    return clean_backbone_state(ckpt, which=which)


@runtime_checkable
class ExportsBackbone(Protocol):
    """A training method (``pathflow.train.methods.SSLMethod``): it names the backbone to
    export; its ``student.backbone``, where it has one, is the ``which="student"`` one."""

    def backbone_for_export(self) -> nn.Module: ...


def _backbone_state(model_or_checkpoint: Any, which: str) -> dict[str, Tensor]:
    obj = model_or_checkpoint
    if isinstance(obj, nn.Module):
        obj = getattr(obj, "module", obj)  # DDP
        obj = getattr(obj, "_orig_mod", obj)  # torch.compile
        if isinstance(obj, ExportsBackbone):
            if which == "student" and hasattr(obj, "student"):
                obj = obj.student.backbone  # type: ignore[union-attr]
            else:
                obj = obj.backbone_for_export()
            return {_strip_wrappers(k): v for k, v in obj.state_dict().items()}
        return clean_backbone_state(obj.state_dict(), which=which)
    return load_backbone_state(obj, which=which)


def export_backbone(
    model_or_checkpoint: nn.Module | str | os.PathLike[str] | Mapping[str, Any],
    out: str | os.PathLike[str],
    arch: str,
    which: str = "teacher",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Write the backbone of a method, module or checkpoint as timm-compatible safetensors.

    Args:
        model_or_checkpoint: an :class:`~pathflow.train.methods.SSLMethod` (DINO: teacher
            backbone; SimCLR: backbone), possibly DDP-wrapped or compiled; a backbone module;
            or anything :func:`load_backbone_state` reads.
        out: destination ``.safetensors`` (written atomically).
        arch: timm name (or ``resnet50_trunc``), stored in the file's metadata.
        which: ``"teacher"`` or ``"student"`` for DINO-style sources.
        mean, std: the per-channel input normalisation used in training, stored in the
            metadata (``pathflow extract --norm auto`` then uses it).
    """
    from safetensors.torch import save_file

    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")

    state = _backbone_state(model_or_checkpoint, which)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "arch": arch, "producer": "pathflow"}
    if arch == "resnet50_trunc":
        metadata["note"] = (
            "CLAM truncated ResNet-50 (no layer4): pathflow.train.load_backbone("
            "'resnet50_trunc', path), or timm resnet50 with layer4 = nn.Identity()"
        )
    if mean is not None and std is not None:
        metadata["mean"] = json.dumps(_triple(mean, "mean"))
        metadata["std"] = json.dumps(_triple(std, "std"))
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def _triple(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(out)}")
    return out


def weights_normalization(
    path: str | os.PathLike[str],
) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """``(mean, std)`` recorded in a ``.safetensors`` file's metadata by
    :func:`export_backbone`, or None (other formats, or not recorded). Reads the header only."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
    if "mean" not in meta or "std" not in meta:
        return None
    try:
        mean, std = (
            _triple(json.loads(meta["mean"]), "mean"),
            _triple(json.loads(meta["std"]), "std"),
        )
    except (ValueError, TypeError) as exc:
        raise PathflowError(f"{p}: bad mean/std in the metadata ({exc})") from exc
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


#: First components of the keys of classifier heads, ignored when loading a backbone.
_HEAD_PREFIXES = ("head", "fc", "classifier", "heads")


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a backbone state dict into ``model``: timm's ``checkpoint_filter_fn`` of the
    model's family applied (original-checkpoint conversions), classifier-head keys the model
    lacks dropped, then every key must match in name and shape (the shape as given: a
    position embedding or patch kernel of another size is an error, not resampled).

    Raises:
        PathflowError: naming how many keys are missing, unexpected or of another shape.
    """
    sd = dict(state)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = dict(filt(sd, model))
        except Exception as exc:
            log.debug("checkpoint_filter_fn failed (%s); loading as is", exc)
    own = model.state_dict()
    for k in [k for k in sd if k not in own and k.split(".")[0] in _HEAD_PREFIXES]:
        del sd[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # shapes as given: the filter may resize (timm resamples pos_embed / patch kernels),
    # which would hide weights made for another input size or patch size
    given = {k: tuple(v.shape) for k, v in state.items()}
    bad_shape = [
        k for k in sd
        if k in own and given.get(k, tuple(sd[k].shape)) != tuple(own[k].shape)
    ]  # fmt: skip
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise PathflowError(f"weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def load_backbone(
    arch: str,
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    which: str = "teacher",
    weights_only: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build ``arch`` with :func:`~pathflow.models.backbones.create_backbone` and load
    ``source`` into it strictly (:func:`load_state_strict`: every backbone key must match).

    Args:
        arch: timm name or ``resnet50_trunc``.
        source: anything :func:`load_backbone_state` reads (file or checkpoint dict); None
            keeps the initialisation (random, or timm's weights with ``pretrained=True``).
        which: ``"teacher"`` or ``"student"`` for DINO-style sources.
        weights_only: see :func:`load_backbone_state`.
        kwargs: passed to ``create_backbone`` (``pretrained``, ``img_size``...).

    The module's feature dimension is ``module.num_features``.

    Example:
        >>> net = load_backbone("vit_small_patch16_224", "backbone.safetensors")  # doctest: +SKIP
    """
    state = load_backbone_state(source, which, weights_only) if source is not None else None
    size = _trained_img_size(state) if state is not None and "img_size" not in kwargs else None
    sized: dict[str, Any] = {**kwargs, "img_size": size} if size else kwargs
    try:
        model, _ = create_backbone(arch, **sized)
    except TypeError as exc:  # ViT weights (their input size) for a model without img_size
        if size is None or "img_size" not in str(exc):
            raise
        model, _ = create_backbone(arch, **kwargs)
    if state is not None:
        _check_family(arch, model, state)
        load_state_strict(model, state)
    return model


class ArchMismatchError(PathflowError):
    """Weights of one model family (a ViT, a ResNet) given to a model of another."""

    def __init__(self, family: str, keys: list[str], arch: str) -> None:
        self.family, self.keys, self.arch = family, keys, arch
        super().__init__(f"the weights look like {family} (keys {', '.join(keys)}) but the "
                         f"backbone is {arch}")  # fmt: skip


#: Keys that tell a state dict's family: all of them present.
_FAMILY_KEYS = {
    "a ViT": ("cls_token", "pos_embed", "patch_embed.proj.weight"),
    "a ResNet": ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight"),
}


def _family_of_state(state: Mapping[str, Tensor]) -> tuple[str, list[str]] | None:
    for family, keys in _FAMILY_KEYS.items():
        found = [k for k in keys if k in state]
        if len(found) >= 2:
            return family, found
    return None


def _check_family(arch: str, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise :class:`ArchMismatchError` when ``state`` is a ViT's and ``model`` is not, or a
    ResNet's and ``model`` is not (other families: left to :func:`load_state_strict`)."""
    found = _family_of_state(state)
    if found is None:
        return
    own = _family_of_state(model.state_dict())
    if own is None or own[0] != found[0]:
        raise ArchMismatchError(found[0], found[1], arch)


def _trained_img_size(state: Mapping[str, Tensor]) -> int | None:
    """Input size a ViT's weights were made for (its position grid x patch size), so that a
    backbone trained with ``--img-size 96`` is rebuilt with its own 6 x 6 position grid rather
    than resampled to timm's 224 px default; None for other models."""
    pos, kernel = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or kernel is None or pos.ndim != 3 or kernel.ndim != 4:
        return None
    n = int(pos.shape[1]) - 1  # one [CLS] token
    g = math.isqrt(max(n, 0))
    if g * g != n or g == 0:
        return None
    return g * int(kernel.shape[-1])


__all__ = [
    "ArchMismatchError",
    "ExportsBackbone",
    "clean_backbone_state",
    "export_backbone",
    "load_backbone",
    "load_backbone_state",
    "load_state_strict",
    "weights_normalization",
]
