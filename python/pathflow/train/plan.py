"""What a training run is, once its data is open: :class:`RunPlan`.

:class:`~pathflow.train.config.TrainConfig` is what the user wrote (never changed by a run);
the plan is what the trainer made of it on this machine: the device, the precision, the
number of processes, the batches per epoch of the loader, the total steps and every schedule
length in steps. Methods are built from ``(backbone, embed_dim, options, plan)``. Torch-free.

Schedule lengths in epochs become steps by one rule (:class:`StepClock`): counted in epochs
(no ``--steps``), ``epochs x steps_per_epoch``; with ``--steps``, the same fraction of the run
as in the recipe's ``--epochs``; never more than the run.

Example:
    >>> from pathflow.train.plan import StepClock
    >>> clock = StepClock(epochs=100, steps=1000, steps_per_epoch=None)
    >>> clock.total_steps, clock.steps_or_epochs(None, 10.0), clock.steps_or_epochs(7, None)
    (1000, 100, 7)
    >>> StepClock(epochs=5, steps=None, steps_per_epoch=40).epochs_to_steps(1.5)
    60
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pathflow.exceptions import ConfigError


def h(text: str) -> dict[str, Any]:
    """The ``metadata`` of a config field: its ``--help`` text."""
    return {"help": text}


def schedule_warnings(lengths: dict[str, int], total: int) -> list[str]:
    """One line per schedule of ``lengths`` that covers the whole run of ``total`` steps
    (it never reaches its end)."""
    return [
        f"{name} lasts {n} steps, the whole run of {total}: it never ends "
        "(shorten it, or give the run more steps)"
        for name, n in lengths.items()
        if n >= total
    ]


@dataclass(frozen=True)
class StepClock:
    """The run's length: ``epochs`` (of the recipe, with ``steps``), ``steps`` (None:
    counted in epochs) and the loader's ``steps_per_epoch`` (None until the data is open)."""

    epochs: int
    steps: int | None
    steps_per_epoch: int | None

    @property
    def total_steps(self) -> int:
        """Length of the schedules: ``steps``, else ``epochs * steps_per_epoch``."""
        if self.steps is not None:
            return int(self.steps)
        if self.steps_per_epoch is None:
            raise ConfigError("steps_per_epoch is unknown until the loader is built")
        return int(self.epochs * self.steps_per_epoch)

    def epochs_to_steps(self, epochs: float) -> int:
        """A schedule length in epochs, as steps (at most ``total_steps``)."""
        if self.steps is None:
            steps = round(epochs * (self.steps_per_epoch or 0))
        else:
            steps = round(epochs / self.epochs * self.steps)
        return max(0, min(steps, self.total_steps))

    def steps_or_epochs(self, steps: int | None, epochs: float | None) -> int:
        """``steps`` when given (at most ``total_steps``), else ``epochs`` converted."""
        if steps is not None:
            return max(0, min(int(steps), self.total_steps))
        return self.epochs_to_steps(epochs or 0.0)


@dataclass(frozen=True)
class RunPlan(StepClock):
    """The run as the trainer planned it (frozen): what methods and the loop read.

    ``precision`` and ``compile`` are resolved (``bf16`` and compiled on CUDA by default),
    ``data`` is the resolved training data, ``lr_warmup`` and ``schedule_lengths`` are in
    steps (lr warmup first, then the method's own), ``peak_lr`` is the lr scaled to the global
    batch. ``views``, ``global_size``, ``local_size`` and ``num_local`` describe the loader's
    views; ``channels_last`` is the user's setting (None: CNNs).
    """

    method: str = "dino"
    arch: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    world_size: int = 1
    batch_size: int = 1
    seed: int = 0
    data: str = ""
    positives: str = "augment"
    views: str | None = None
    global_size: int | None = None
    local_size: int | None = None
    num_local: int | None = None
    channels_last: bool | None = None
    peak_lr: float = 0.0
    lr_warmup: int = 0
    schedule_lengths: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_config(cls, cfg: Any, **run: Any) -> RunPlan:
        """The plan of a resolved :class:`~pathflow.train.config.TrainConfig`; ``run``
        overrides what only the run knows (``device``, ``precision``, ``compile``,
        ``world_size``, ``steps_per_epoch``, ``data``). Without them, the config's own
        values (``steps_per_epoch`` and ``world_size`` as given, ``auto`` precision fp32)."""
        values: dict[str, Any] = {
            "epochs": cfg.epochs,
            "steps": cfg.steps,
            "steps_per_epoch": cfg.steps_per_epoch,
            "method": cfg.method,
            "arch": str(cfg.arch),
            "device": str(cfg.device),
            "precision": cfg.precision if cfg.precision != "auto" else "fp32",
            "compile": bool(cfg.compile),
            "world_size": cfg.world_size,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "data": str(cfg.data),
            "positives": cfg.positives,
            "views": cfg.views,
            "global_size": cfg.global_size,
            "local_size": cfg.local_size,
            "num_local": cfg.num_local,
            "channels_last": cfg.channels_last,
        }
        unknown = set(run) - set(values)
        if unknown:
            raise TypeError(f"RunPlan.from_config: unknown run value(s) {sorted(unknown)}")
        values.update(run)
        clock = StepClock(values["epochs"], values["steps"], values["steps_per_epoch"])
        warmup = clock.steps_or_epochs(cfg.warmup_steps, cfg.warmup_epochs)
        lengths = {"lr_warmup": warmup}
        if cfg.options is not None and not isinstance(cfg.options, dict):
            lengths.update(cfg.options.schedule_lengths(clock))
        assert cfg.lr is not None, "resolve() first"
        peak = cfg.lr * cfg.batch_size * values["world_size"] / 256.0
        return cls(
            **values, peak_lr=peak, lr_warmup=warmup, schedule_lengths=tuple(lengths.items())
        )

    def lengths(self) -> dict[str, int]:
        """Every schedule length of the run in steps (lr warmup and the method's own)."""
        return dict(self.schedule_lengths)

    def warnings(self) -> list[str]:
        """:func:`schedule_warnings` of the plan's schedules."""
        return schedule_warnings(self.lengths(), self.total_steps)

    def replace(self, **changes: Any) -> RunPlan:
        """A copy with ``changes`` (the plan itself never changes)."""
        return dataclasses.replace(self, **changes)


__all__ = ["RunPlan", "StepClock", "h", "schedule_warnings"]
