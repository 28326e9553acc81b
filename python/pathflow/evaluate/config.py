"""Configuration of ``pathflow eval knn|linear`` (dataclass <- YAML <- CLI), saved as
``<out>/<method>/config.yaml``.

Example:
    >>> from pathflow.evaluate.config import EvalConfig
    >>> cfg = EvalConfig(method="knn", data="NCT-CRC-HE-100K", arch="resnet50")
    >>> cfg.k, cfg.temperature, cfg.test_fraction, cfg.group_by
    (20, 0.07, 0.2, 'auto')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.evaluate.groups import GROUP_BY
from pathflow.exceptions import ConfigError
from pathflow.extract.config import ModelOptions, YamlConfig

DEFAULT_WEIGHT_DECAYS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


@dataclass
class EvalConfig(ModelOptions, YamlConfig):
    """Everything ``pathflow eval`` needs; field names are the YAML keys."""

    _section = "eval"

    method: str = "knn"
    data: str | None = None
    train: str | None = None
    test: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    max_per_class: int | None = None
    #: split DATA keeping each group's images on one side: auto (by slide where every
    #: image's slide is known, else at random), slide, patient or none
    #: (:mod:`pathflow.evaluate.groups`); ``groups``: CSV file -> slide/patient
    group_by: str = "auto"
    groups: str | None = None
    out: str = "pathflow_eval"
    # knn
    k: int = 20
    temperature: float = 0.07
    # linear probe
    weight_decays: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS))
    val_fraction: float = 0.2
    max_iter: int = 500
    # plot
    plot: bool = True
    plot_points: int = 5000

    def validate(self) -> None:
        if self.method not in ("knn", "linear"):
            raise ConfigError(f"method must be knn or linear, got {self.method!r}")
        self.validate_model()
        if self.data is None and (self.train is None or self.test is None):
            raise ConfigError("give a labelled folder DATA (split by --test-fraction) "
                              "or both --train DIR and --test DIR")  # fmt: skip
        if self.data is not None and (self.train is not None or self.test is not None):
            raise ConfigError("give either DATA or --train/--test, not both")
        for name in ("data", "train", "test"):
            v = getattr(self, name)
            if v is not None and not Path(v).is_dir():
                raise ConfigError(f"{v}: not a folder (expected ROOT/<class>/<image>)")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--test-fraction and --val-fraction must be in (0, 1)")
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"--k must be >= 1 and --temperature > 0 (got {self.k}, "
                              f"{self.temperature})")  # fmt: skip
        self.weight_decays = [float(w) for w in self.weight_decays]
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError("--weight-decays needs one or more values >= 0")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ConfigError("--max-per-class must be >= 1")
        if self.group_by not in GROUP_BY:
            raise ConfigError(f"--group-by must be one of {', '.join(GROUP_BY)}, "
                              f"got {self.group_by!r}")  # fmt: skip
        if self.groups is not None and not Path(self.groups).is_file():
            raise ConfigError(f"{self.groups}: groups file not found")
        if self.groups is not None and self.group_by == "none":
            raise ConfigError("--groups needs --group-by auto, slide or patient (not none)")

    def model_key(self) -> dict[str, Any]:
        """Fields that change the features (the cache key): the weights by content (sha256 of
        the file; hashed on each call, so call it once per run), the resolved precision (bf16
        autocast or fp32)."""
        from pathflow.outputs import sha256_file

        return {
            "arch": self.arch,
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "weights_sha256": sha256_file(self.weights) if self.weights else None,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "norm": self.norm,
            "precision": self.resolved_precision(),
        }
