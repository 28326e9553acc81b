"""Configuration of ``pathflow train``: a dataclass <- YAML file <- CLI flags.

Method-dependent fields default to ``None`` and are filled by :meth:`TrainConfig.resolve`
from :data:`METHOD_DEFAULTS` (DINO: the official ViT-S/16 recipe; SimCLR: AdamW settings for
the NT-Xent objective). ``steps_per_epoch`` and ``steps`` are filled by the trainer from the
loader; the resolved config is saved as ``config.yaml`` beside the run's outputs.

Field names are the YAML keys; CLI flags are the same names with dashes
(``weight_decay_end`` -> ``--weight-decay-end``). This module imports neither torch nor timm.

Example:
    >>> from pathflow.train.config import TrainConfig
    >>> cfg = TrainConfig(method="dino", data="run/shards", batch_size=128).resolve()
    >>> cfg.lr, cfg.weight_decay, cfg.weight_decay_end, cfg.views
    (0.0005, 0.04, 0.4, 'dino')
    >>> cfg.scaled_lr(world_size=2)  # lr * global batch / 256, as dino
    0.0005
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError

#: Defaults of the fields left ``None``, per method.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino": {
        "lr": 5e-4,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.1,
        "clip_grad": 3.0,
        "views": "dino",
    },
    "simclr": {
        "lr": 1e-3,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
        "views": "simclr",
    },
}

PRECISIONS = ("auto", "bf16", "fp32")


def _h(text: str) -> Any:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything ``pathflow train`` needs (see ``pathflow train --help``)."""

    # what to train
    method: str = field(default="dino", metadata=_h("SSL method: dino or simclr"))
    arch: str = field(
        default="vit_small_patch16_224",
        metadata=_h("any timm model name, or resnet50_trunc (CLAM's ResNet-50 to layer3)"),
    )
    pretrained: bool = field(default=False, metadata=_h("start from timm's pretrained weights"))
    img_size: int | None = field(
        default=None, metadata=_h("timm img_size of ViTs (size of the position embedding)")
    )
    data: str = field(default="", metadata=_h("shard folder (or shards.json) of pathflow tile"))
    out: str = field(default="pathflow_train", metadata=_h("output folder of the run"))
    # length and optimisation
    epochs: int = field(default=100, metadata=_h("epochs (ignored when --steps is given)"))
    steps: int | None = field(
        default=None, metadata=_h("total optimisation steps (default: epochs x batches/epoch)")
    )
    stop_after: int | None = field(
        default=None,
        metadata=_h("stop (with a checkpoint) once this many steps are done, keeping the "
                    "schedules of the full run; --resume continues"),
    )  # fmt: skip
    batch_size: int = field(default=64, metadata=_h("images per process and step"))
    lr: float | None = field(
        default=None,
        metadata=_h("peak learning rate at a global batch of 256, scaled by batch/256 "
                    "(dino 5e-4, simclr 1e-3)"),
    )  # fmt: skip
    min_lr: float = field(default=1e-6, metadata=_h("learning rate at the end of the cosine"))
    warmup_epochs: float | None = field(
        default=None, metadata=_h("linear learning-rate warmup in epochs (default 10)")
    )
    warmup_steps: int | None = field(
        default=None, metadata=_h("linear warmup in steps (overrides --warmup-epochs)")
    )
    weight_decay: float | None = field(
        default=None, metadata=_h("initial weight decay (dino 0.04, simclr 1e-6)")
    )
    weight_decay_end: float | None = field(
        default=None, metadata=_h("final weight decay of the cosine schedule (dino 0.4)")
    )
    clip_grad: float | None = field(
        default=None, metadata=_h("max global gradient norm, 0 = off (dino 3.0)")
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata=_h("stochastic depth of the student backbone (dino 0.1, its ViT recipe)"),
    )
    # DINO
    out_dim: int = field(default=65536, metadata=_h("DINO head output dimension"))
    norm_last_layer: bool = field(
        default=True, metadata=_h("DINO: fix the weight-norm gain of the last layer to 1")
    )
    momentum_teacher: float = field(
        default=0.996, metadata=_h("DINO: teacher EMA momentum, cosine to 1")
    )
    teacher_temp: float = field(default=0.07, metadata=_h("DINO: teacher temperature"))
    warmup_teacher_temp: float = field(
        default=0.04, metadata=_h("DINO: initial teacher temperature")
    )
    warmup_teacher_temp_epochs: float = field(
        default=30.0, metadata=_h("DINO: epochs of teacher temperature warmup")
    )
    student_temp: float = field(default=0.1, metadata=_h("DINO: student temperature"))
    center_momentum: float = field(default=0.9, metadata=_h("DINO: centre EMA momentum"))
    freeze_last_layer: float = field(
        default=1.0, metadata=_h("DINO: epochs during which the last layer is not trained")
    )
    # SimCLR
    temperature: float = field(default=0.1, metadata=_h("SimCLR: NT-Xent temperature"))
    proj_hidden_dim: int = field(default=2048, metadata=_h("SimCLR: projector hidden width"))
    proj_dim: int = field(default=128, metadata=_h("SimCLR: projector output dimension"))
    # views (pathflow.data presets)
    views: str | None = field(
        default=None,
        metadata=_h("view preset of the loader (default: the method's, dino or simclr; also "
                    "pathology, pathology-dino, byol)"),
    )  # fmt: skip
    global_size: int | None = field(default=None, metadata=_h("size of the global views"))
    local_size: int | None = field(default=None, metadata=_h("size of the local views"))
    num_local: int | None = field(default=None, metadata=_h("number of local views (dino 8)"))
    # run
    device: str = field(default="auto", metadata=_h("auto, cpu, cuda"))
    precision: str = field(
        default="auto", metadata=_h("bf16 (autocast) or fp32; auto: bf16 on CUDA, fp32 on CPU")
    )
    compile: bool | None = field(
        default=None, metadata=_h("torch.compile the backbones (default: on CUDA only)")
    )
    channels_last: bool | None = field(
        default=None, metadata=_h("channels-last memory format (default: CNNs)")
    )
    loader_backend: str = field(default="auto", metadata=_h("data loader: auto, dali, torch"))
    num_workers: int = field(default=2, metadata=_h("loader workers (torch) or threads (DALI)"))
    seed: int = field(default=0, metadata=_h("seed of the weights, data order and augmentations"))
    save_every: int = field(default=500, metadata=_h("checkpoint every N steps (and at the end)"))
    log_every: int = field(default=10, metadata=_h("log metrics every N steps"))
    resume: bool = field(
        default=False, metadata=_h("continue from OUT/checkpoint.pt when it exists")
    )
    tensorboard: bool = field(default=True, metadata=_h("write TensorBoard scalars to OUT/tb"))
    # filled by the trainer
    steps_per_epoch: int | None = field(
        default=None, metadata=_h("batches per epoch on each rank (filled from the loader)")
    )
    world_size: int = field(default=1, metadata=_h("processes (filled at run time)"))

    # ----------------------------------------------------------------------------------
    def resolve(self) -> TrainConfig:
        """Fill method defaults and validate."""
        if self.method not in METHOD_DEFAULTS:
            raise ConfigError(
                f"unknown method {self.method!r} (expected {', '.join(METHOD_DEFAULTS)})"
            )
        out = dataclasses.replace(self)
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        if out.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {out.precision!r}")
        for name in ("batch_size", "epochs", "save_every", "log_every"):
            if getattr(out, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(out, name)}")
        for name in ("steps", "stop_after"):
            value = getattr(out, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if out.lr is not None and out.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {out.lr}")
        if out.temperature <= 0 or out.student_temp <= 0 or out.teacher_temp <= 0:
            raise ConfigError("temperatures must be > 0")
        if not 0 <= out.momentum_teacher <= 1:
            raise ConfigError(f"momentum_teacher must be in [0, 1], got {out.momentum_teacher}")
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def total_steps(self) -> int:
        """Length of the schedules: ``steps``, else ``epochs * steps_per_epoch``."""
        if self.steps is not None:
            return int(self.steps)
        if self.steps_per_epoch is None:
            raise ConfigError("steps_per_epoch is unknown until the loader is built")
        return int(self.epochs * self.steps_per_epoch)

    def epochs_to_steps(self, epochs: float) -> int:
        """Convert a duration in epochs to steps (at least 0, at most ``total_steps``)."""
        per_epoch = self.steps_per_epoch or self.total_steps
        return max(0, min(round(epochs * per_epoch), self.total_steps))

    def warmup(self) -> int:
        """Learning-rate warmup in steps."""
        if self.warmup_steps is not None:
            return max(0, min(self.warmup_steps, self.total_steps))
        return self.epochs_to_steps(self.warmup_epochs or 0.0)

    def scaled_lr(self, world_size: int | None = None) -> float:
        """Peak learning rate: ``lr * batch_size * world_size / 256`` (dino's linear rule)."""
        ws = self.world_size if world_size is None else world_size
        assert self.lr is not None, "resolve() first"
        return self.lr * self.batch_size * ws / 256.0

    @property
    def epochs_total(self) -> int:
        """Epochs covered by ``total_steps`` (the last one possibly partial)."""
        return math.ceil(self.total_steps / max(self.steps_per_epoch or 1, 1))

    # ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the YAML written beside outputs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as YAML (atomically)."""
        import yaml

        from pathflow.train.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Field name -> evaluated type annotation."""
        return typing.get_type_hints(cls)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a YAML file into a dict of known fields (dashes allowed in keys; a top-level
        ``train:`` mapping is accepted too)."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        if isinstance(data.get("train"), dict):
            data = data["train"]
        known = set(cls.field_names())
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{p}: unknown option {key!r}")
            out[name] = value
        return out

    @classmethod
    def build(cls, yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
        """Defaults <- YAML <- CLI (only options given on the command line), then resolve."""
        merged = {**yaml_values, **cli_values}
        try:
            cfg = cls(**merged)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
        return cfg.resolve()


__all__ = ["METHOD_DEFAULTS", "PRECISIONS", "TrainConfig"]
