"""Configuration of ``pathflow train``: a dataclass <- YAML file <- CLI flags.

Shared fields (length, optimiser, views, run control) are :class:`TrainConfig`'s; each
method's own options are its config dataclass (``pathflow.train.methods.<name>``), given in
YAML as a section named after the method and on the command line as ``--METHOD.OPTION``::

    method: dino
    lr: 5e-4
    dino:
      out_dim: 65536
      warmup_teacher_temp_epochs: 30

Fields left ``None`` take the method's recipe (``MethodConfig.recipe``) in
:meth:`TrainConfig.resolve`, after a named ``--recipe`` (:mod:`pathflow.train.recipes`):
command line > YAML > ``--recipe`` > method recipe > :class:`TrainConfig` defaults.
A run never changes its config: the trainer plans it (:class:`~pathflow.train.plan.RunPlan`,
with ``steps_per_epoch`` from the loader) and saves the resolved config with the run's
``precision``, ``compile``, ``steps_per_epoch`` and ``world_size`` as ``config.yaml``
beside the run's outputs.

**Schedule lengths.** Lengths given in epochs (lr warmup, DINO's teacher-temperature warmup
and frozen last layer) become ``epochs x steps_per_epoch`` steps. With ``--steps`` the run is
not counted in epochs, so they are read as fractions of the recipe's ``--epochs`` (default
100): a 10-epoch warmup is the first 10% of the steps. Explicit ``*_steps`` fields override.

Example:
    >>> from pathflow.train.config import TrainConfig
    >>> cfg = TrainConfig(method="dino", data="run/shards", batch_size=128, steps=1000).resolve()
    >>> cfg.lr, cfg.weight_decay, cfg.weight_decay_end, cfg.views
    (0.0005, 0.04, 0.4, 'dino')
    >>> cfg.warmup(), cfg.options.out_dim  # 10 of 100 epochs -> 10% of 1000 steps
    (100, 65536)
    >>> cfg.scaled_lr(world_size=2)  # lr * global batch / 256, as dino
    0.0005
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pathflow.choices import OPTIMIZERS, POSITIVES, TRAIN_PRECISIONS
from pathflow.config import YamlConfig, coerce
from pathflow.exceptions import ConfigError
from pathflow.train.plan import StepClock, schedule_warnings
from pathflow.train.plan import h as _h

PRECISIONS = TRAIN_PRECISIONS

#: Options that may differ between a run and its ``--resume`` (they do not change what
#: trains); ``steps_per_epoch`` and ``world_size`` are checked on their own.
RUN_CONTROL = (
    "stop_after", "save_every", "log_every", "tensorboard", "resume", "allow_changed",
    "num_workers", "compile", "out", "data", "steps_per_epoch", "world_size",
    "signal_checkpoint",
)  # fmt: skip


#: Options added after runs were first saved, and the value that reproduces how those runs
#: trained (a checkpoint without the option resumes when the option has this value).
_OLDER_BEHAVIOUR: dict[str, Any] = {
    "optimizer": "adamw", "momentum": None, "lars_eta": 0.001, "recipe": None,
}  # fmt: skip

#: The backbone of methods whose recipe names none.
DEFAULT_ARCH = "vit_small_patch16_224"


@dataclass
class TrainConfig(YamlConfig):
    """Everything ``pathflow train`` needs (see ``pathflow train --help``)."""

    _section = "train"

    # what to train
    method: str = field(default="dino", metadata=_h("SSL method (pathflow.train.list_methods())"))
    recipe: str | None = field(
        default=None,
        metadata=_h(
            "named recipe (pathflow.train.recipes.list_recipes(): lunit-mocov2, lunit-swav, "
            "lunit-barlow, lunit-dino): method, backbone, hyper-parameters and views, for "
            "options not given (precedence: CLI > YAML > recipe > method recipe > defaults)"
        ),
    )
    arch: str | None = field(
        default=None,  # resolved: the method's recipe, else DEFAULT_ARCH
        metadata=_h(
            "any timm model name, resnet50_trunc (CLAM's ResNet-50 to layer3) or vit4k_xs "
            "(HIPT's ViT-4K); default: the method's (vit_small_patch16_224; hipt4k: vit4k_xs)"
        ),
    )
    pretrained: bool = field(default=False, metadata=_h("start from timm's pretrained weights"))
    img_size: int | None = field(
        default=None, metadata=_h("timm img_size of ViTs (size of the position embedding)")
    )
    data: str = field(
        default="",
        metadata=_h(
            "output folder of pathflow tile --shards, its shards/ folder, shards.json, "
            "or any WebDataset folder"
        ),
    )
    out: str = field(default="pathflow_train", metadata=_h("output folder of the run"))
    # length and optimisation
    epochs: int = field(
        default=100,
        metadata=_h(
            "epochs; with --steps, the recipe length that epoch-based schedule lengths "
            "are fractions of (warmup 10 of 100 epochs = the first 10%% of the steps)"
        ),
    )
    steps: int | None = field(
        default=None, metadata=_h("total optimisation steps (default: epochs x batches/epoch)")
    )
    stop_after: int | None = field(
        default=None,
        metadata=_h("stop (with a checkpoint) after this many steps of this job, keeping the "
                    "schedules of the full run; --resume continues"),
    )  # fmt: skip
    batch_size: int = field(default=64, metadata=_h("images per process and step"))
    lr: float | None = field(
        default=None,
        metadata=_h("peak learning rate at a global batch of 256, scaled by batch/256 "
                    "(method default)"),
    )  # fmt: skip
    min_lr: float = field(default=1e-6, metadata=_h("learning rate at the end of the cosine"))
    warmup_epochs: float | None = field(
        default=None, metadata=_h("linear learning-rate warmup in epochs (method default)")
    )
    warmup_steps: int | None = field(
        default=None, metadata=_h("linear warmup in steps (overrides --warmup-epochs)")
    )
    weight_decay: float | None = field(
        default=None, metadata=_h("initial weight decay (method default)")
    )
    weight_decay_end: float | None = field(
        default=None, metadata=_h("final weight decay of the cosine schedule (method default)")
    )
    optimizer: str | None = field(
        default=None,
        metadata=_h(
            "adamw, sgd (with momentum) or lars (SGD with layer-wise trust ratios, "
            "biases and norm layers excluded, as BYOL/Barlow Twins); default: the "
            "method's, else adamw"
        ),
    )
    momentum: float | None = field(
        default=None, metadata=_h("momentum of sgd and lars (default 0.9; not for adamw)")
    )
    lars_eta: float = field(
        default=0.001, metadata=_h("trust coefficient eta of lars (BYOL, Barlow Twins)")
    )
    clip_grad: float | None = field(
        default=None,
        metadata=_h(
            "gradient clipping threshold, 0 = off: dino clips each parameter's gradient "
            "norm (as facebookresearch/dino), other methods the global norm"
        ),
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata=_h("stochastic depth of the student backbone (method default)"),
    )
    # views (pathflow.data presets)
    views: str | None = field(
        default=None,
        metadata=_h("view preset of the loader (default: the method's, dino or simclr; also "
                    "pathology, pathology-dino, byol, sgcl, sgcl-mcrop)"),
    )  # fmt: skip
    global_size: int | None = field(default=None, metadata=_h("size of the global views"))
    local_size: int | None = field(default=None, metadata=_h("size of the local views"))
    num_local: int | None = field(default=None, metadata=_h("number of local views (dino 8)"))
    positives: str = field(
        default="augment",
        metadata=_h("what a positive pair is: augment (two views of a patch), neighbour (a "
                    "patch of the same slide within --neighbour-radius grid steps) or scale "
                    "(the same spot at another magnification, shards tiled with --shard-mpps)"),
    )  # fmt: skip
    neighbour_radius: float = field(
        default=2.0,
        metadata=_h("with --positives neighbour: radius in grid steps (Chebyshev; 2 = the "
                    "5 x 5 block around the patch)"),
    )  # fmt: skip
    # run
    device: str = field(default="auto", metadata=_h("auto, cpu, cuda or cuda:N"))
    precision: str = field(
        default="auto", metadata=_h("bf16 (autocast) or fp32; auto: bf16 on CUDA, fp32 on CPU")
    )
    compile: bool | None = field(
        default=None, metadata=_h("torch.compile the backbones (default: on CUDA only)")
    )
    channels_last: bool | None = field(
        default=None, metadata=_h("channels-last memory format (default: CNNs)")
    )
    loader_backend: str = field(
        default="auto",
        metadata=_h("data loader backend: auto (DALI on CUDA, else torch) or a registered one"),
    )
    num_workers: int = field(default=2, metadata=_h("loader workers (torch) or threads (DALI)"))
    seed: int = field(default=0, metadata=_h("seed of the weights, data order and augmentations"))
    save_every: int = field(default=500, metadata=_h("checkpoint every N steps (and at the end)"))
    log_every: int = field(default=10, metadata=_h("log metrics every N steps"))
    resume: bool = field(
        default=False, metadata=_h("continue from OUT/checkpoint.pt when it exists")
    )
    tensorboard: bool = field(default=True, metadata=_h("write TensorBoard scalars to OUT/tb"))
    signal_checkpoint: str = field(
        default="USR1",
        metadata=_h(
            "on this signal (USR1, USR2, TERM, INT, HUP or none) stop within a step or two, "
            "checkpoint and exit with status 75, for SLURM's --signal=USR1@120 and a requeued "
            "--resume"
        ),
    )
    allow_changed: list[str] = field(
        default_factory=list,
        metadata=_h(
            "with --resume: options allowed to differ from the checkpoint's (e.g. "
            "lr epochs); run-control options (stop_after, save_every, log_every, ...) "
            "may always differ"
        ),
    )
    # the method's own options (a section named after the method in YAML, --METHOD.NAME flags)
    options: Any = field(
        default=None,
        metadata=_h("the method's options: its config dataclass, or a dict of its fields"),
    )
    # recorded in the saved config.yaml of a run (from its RunPlan); a config never changes
    steps_per_epoch: int | None = field(
        default=None, metadata=_h("batches per epoch on each rank (filled from the loader)")
    )
    world_size: int = field(default=1, metadata=_h("processes (filled at run time)"))

    # ----------------------------------------------------------------------------------
    def resolve(self) -> TrainConfig:
        """Fill the method's recipe and options, convert every value to its type, validate."""
        from pathflow.train.backbones import check_backbone
        from pathflow.train.methods import method_class

        types_ = self.field_types()
        out = dataclasses.replace(self)
        for name in self.field_names():
            if name != "options":
                setattr(out, name, coerce(getattr(out, name), types_[name], name))
        if out.recipe is not None:
            out = out._apply_recipe()
        cls = method_class(out.method)  # ConfigError naming the registered methods
        opts_cls = cls.config_class
        for name, value in opts_cls.recipe.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        if out.arch is None:
            out.arch = DEFAULT_ARCH
        check_backbone(out.arch)  # before the data: a misspelt --arch names close matches
        if out.views is None:
            out.views = cls.views_preset
        out.options = opts_cls.from_value(out.options, out.method)
        if out.optimizer is None:
            out.optimizer = "adamw"
        if out.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {out.optimizer!r}")
        if out.optimizer == "adamw":
            if out.momentum is not None:
                raise ConfigError("momentum is an option of --optimizer sgd or lars, not adamw")
        elif out.momentum is None:
            out.momentum = 0.9
        elif not 0 <= out.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {out.momentum}")
        if out.lars_eta <= 0:
            raise ConfigError(f"lars_eta must be > 0, got {out.lars_eta}")
        if out.positives not in POSITIVES:
            raise ConfigError(f"positives must be one of {POSITIVES}, got {out.positives!r}")
        if not out.neighbour_radius > 0:
            raise ConfigError(f"neighbour_radius must be > 0, got {out.neighbour_radius}")
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
        if out.clip_grad is not None and out.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0 (0 = off), got {out.clip_grad}")
        own = {f"{out.method}.{name}" for name in opts_cls.field_names()}  # as resume names them
        unknown = sorted(set(out.allow_changed) - set(self.field_names()) - {out.method} - own)
        if unknown:
            raise ConfigError(f"allow_changed: unknown option(s) {', '.join(unknown)}")
        return out

    def _apply_recipe(self) -> TrainConfig:
        """Fill the fields left ``None`` and the method options not given from ``--recipe``
        (:mod:`pathflow.train.recipes`); the recipe's method replaces the default one."""
        from pathflow.train.recipes import get_recipe

        recipe = get_recipe(str(self.recipe))
        out = dataclasses.replace(self)
        if out.method != recipe.method:
            if out.method != type(self).method:  # the default: not chosen
                raise ConfigError(
                    f"recipe {recipe.name} trains method {recipe.method}, not {out.method}"
                )
            out.method = recipe.method
        types_ = self.field_types()
        for name, value in recipe.fields.items():
            if getattr(out, name) is None:
                setattr(out, name, coerce(value, types_[name], name))
        if out.options is None or isinstance(out.options, dict):
            out.options = {**recipe.options, **(out.options or {})}
        return out

    # ------------------------------------------------------------------ derived values
    def clock(self) -> StepClock:
        """The run's length as given (``steps_per_epoch`` None until a loader fills it in a
        :class:`~pathflow.train.plan.RunPlan`)."""
        return StepClock(self.epochs, self.steps, self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        """Length of the schedules: ``steps``, else ``epochs * steps_per_epoch``."""
        return self.clock().total_steps

    def epochs_to_steps(self, epochs: float) -> int:
        """A schedule length in epochs, as steps (:meth:`StepClock.epochs_to_steps`).

        Counted in epochs (no ``--steps``): ``epochs * steps_per_epoch``. With ``--steps``:
        the same fraction of the run as in the recipe, ``epochs / self.epochs *
        total_steps``. Never more than ``total_steps`` (a length that reaches it is
        reported by :meth:`schedule_warnings`).
        """
        return self.clock().epochs_to_steps(epochs)

    def steps_or_epochs(self, steps: int | None, epochs: float | None) -> int:
        """``steps`` when given (at most ``total_steps``), else ``epochs`` converted."""
        return self.clock().steps_or_epochs(steps, epochs)

    def warmup(self) -> int:
        """Learning-rate warmup in steps."""
        return self.steps_or_epochs(self.warmup_steps, self.warmup_epochs)

    def schedule_lengths(self) -> dict[str, int]:
        """Every schedule length of the run in steps (lr warmup and the method's own)."""
        lengths = {"lr_warmup": self.warmup()}
        lengths.update(self.options.schedule_lengths(self.clock()))
        return lengths

    def schedule_warnings(self) -> list[str]:
        """One line per schedule that covers the whole run (it never reaches its end)."""
        return schedule_warnings(self.schedule_lengths(), self.total_steps)

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
        """Plain dict (the YAML written beside outputs): shared fields, then the method's
        options as a section named after the method."""
        out = {name: getattr(self, name) for name in self.field_names() if name != "options"}
        opts = self.options
        if dataclasses.is_dataclass(opts) and not isinstance(opts, type):
            out[self.method] = dataclasses.asdict(opts)
        elif isinstance(opts, dict):
            out[self.method] = dict(opts)
        return out

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Names of the options that differ from ``other`` (a :meth:`to_dict` of a saved
        run), run-control options left out; method options as ``METHOD.NAME``."""
        mine = self.to_dict()
        diffs = []
        for name, value in mine.items():
            if name in RUN_CONTROL:
                continue
            if name not in other and name in _OLDER_BEHAVIOUR:
                # a run saved before this option existed trained as its value here says
                if value != _OLDER_BEHAVIOUR[name]:
                    diffs.append(name)
                continue
            theirs = other.get(name)
            if isinstance(value, dict) and isinstance(theirs, dict):
                older = getattr(self.options, "older_behaviour", {}) if name == self.method else {}
                diffs += [
                    f"{name}.{k}" for k in sorted(set(value) | set(theirs))
                    if value.get(k) != theirs.get(k, older.get(k))
                ]  # fmt: skip
            elif value != theirs:
                diffs.append(name)
        return diffs

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a YAML file (a top-level ``train:`` mapping is accepted too) into typed
        shared fields; a mapping under a method's name is that method's options."""
        from pathflow.config import read_yaml

        raw = read_yaml(path, cls._section)
        sections = {k: v for k, v in raw.items() if isinstance(v, dict) and k != "options"}
        values = cls.coerce_values({k: v for k, v in raw.items() if k not in sections}, str(path))
        if sections:
            values["_sections"] = sections
        return values

    @classmethod
    def build(cls, yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
        """Defaults <- YAML <- CLI (only options given on the command line), then resolve.

        CLI method options are keys ``METHOD.NAME``; YAML ones the ``_sections`` of
        :meth:`from_yaml`. Only the chosen method's are used; a flag of another method is an
        error, another method's YAML section is ignored (one file may hold several)."""
        from pathflow.train.methods import list_methods

        yaml_values = dict(yaml_values)
        sections: dict[str, Any] = yaml_values.pop("_sections", {})
        flags = {k: v for k, v in cli_values.items() if "." in k}
        shared = {k: v for k, v in cli_values.items() if "." not in k}
        merged = {**yaml_values, **cls.coerce_values(shared)}
        if merged.get("recipe") is not None:
            from pathflow.train.recipes import get_recipe

            recipe_method = get_recipe(str(merged["recipe"])).method
            if merged.setdefault("method", recipe_method) != recipe_method:
                raise ConfigError(
                    f"recipe {merged['recipe']} trains method {recipe_method}, "
                    f"not {merged['method']}"
                )
        method = str(merged.get("method", cls.method))
        methods = list_methods()
        for name in sections:
            if name not in methods:
                raise ConfigError(f"unknown option or method section {name!r}")
        options = dict(sections.get(method, {}))
        if isinstance(merged.get("options"), dict):
            options.update(merged.pop("options"))
        for key, value in flags.items():
            owner, name = key.split(".", 1)
            if owner != method:
                flag = f"--{owner}.{name.replace('_', '-')}"
                raise ConfigError(f"{flag} is an option of method {owner}, not of {method}")
            options[name] = value
        merged["options"] = options
        try:
            cfg = cls(**merged)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
        return cfg.resolve()


__all__ = ["OPTIMIZERS", "PRECISIONS", "RUN_CONTROL", "TrainConfig"]
