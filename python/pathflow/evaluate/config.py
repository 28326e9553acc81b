"""Configuration of ``pathflow eval knn|linear`` (dataclass <- YAML <- CLI), saved as
``<out>/<method>/config.yaml``; of ``eval slide-knn`` and ``eval retrieval``. Numpy-free, so
that the command line builds its parsers from these dataclasses at once.

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

from pathflow.choices import NORM_MODES, SLIDE_FEATURES, one_of
from pathflow.config import YamlConfig
from pathflow.evaluate.groups import GROUP_BY
from pathflow.exceptions import ConfigError
from pathflow.extract.config import ModelOptions
from pathflow.options import opt

#: Values of ``pathflow eval slide-knn --feature`` (kept under its old name).
FEATURE_CHOICES = SLIDE_FEATURES

DEFAULT_WEIGHT_DECAYS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


@dataclass
class EvalConfig(ModelOptions, YamlConfig):
    """Everything ``pathflow eval`` needs; field names are the YAML keys."""

    _section = "eval"

    method: str = "knn"
    data: str | None = field(
        default=None, metadata=opt("labelled folder, split by --test-fraction", positional="?")
    )
    train: str | None = field(default=None, metadata=opt("training folder ROOT/<class>/<image>"))
    test: str | None = field(default=None, metadata=opt("test folder with the same classes"))
    test_fraction: float = field(default=0.2, metadata=opt("test share of DATA (default 0.2)"))
    seed: int = field(default=0, metadata=opt("split / subsample / t-SNE seed (default 0)"))
    max_per_class: int | None = field(default=None, metadata=opt("use at most N images per class"))
    #: split DATA keeping each group's images on one side: auto (by slide where every
    #: image's slide is known, else at random), slide, patient or none
    #: (:mod:`pathflow.evaluate.groups`); ``groups``: CSV file -> slide/patient
    group_by: str = field(
        default="auto",
        metadata=opt(
            "split DATA keeping each slide's (patient's) images on one side; auto (default): by "
            "slide when every image's slide is known (--groups, <stem>.json, pathflow's "
            "<slide>_<x>_<y> names), else at random with a warning",
            choices=GROUP_BY,
        ),
    )
    groups: str | None = field(
        default=None,
        metadata=opt(
            "CSV with columns file (path under DATA, name or stem) and slide and/or patient",
            metavar="CSV",
        ),
    )
    out: str = field(
        default="pathflow_eval",
        metadata=opt("output folder (default pathflow_eval)", flags=("-o",)),
    )
    # knn
    k: int = field(default=20, metadata=opt("neighbours (default 20)", group="knn"))
    temperature: float = field(
        default=0.07, metadata=opt("vote temperature (default 0.07)", group="knn")
    )
    # linear probe
    weight_decays: list[float] = field(
        default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS),
        metadata=opt(
            "weight decays swept on a validation split (default 1e-6 .. 1e-1)", group="linear probe"
        ),
    )
    val_fraction: float = field(
        default=0.2, metadata=opt("validation share (default 0.2)", group="linear probe")
    )
    max_iter: int = field(
        default=500, metadata=opt("L-BFGS iterations (default 500)", group="linear probe")
    )
    # plot
    plot: bool = field(
        default=True, metadata=opt("t-SNE plot of the test embedding (default on; --no-plot)")
    )
    plot_points: int = field(default=5000, metadata=opt("max points in the plot (default 5000)"))

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


@dataclass
class SlideKnnConfig(YamlConfig):
    """Everything ``pathflow eval slide-knn`` needs; field names are the YAML keys."""

    _section = "slide_knn"

    inputs: list[str] = field(
        default_factory=list,
        metadata=opt(
            "folders of <slide>.h5 features files (or the files)",
            positional="*",
            metavar="FEATURES",
        ),
    )
    labels: str | None = field(
        default=None, metadata=opt("CSV with a header holding the slide id and label columns")
    )
    slide_column: str = field(
        default="slide", metadata=opt("slide id column of --labels (default slide)")
    )
    label_column: str = field(
        default="label", metadata=opt("label column of --labels (default label)")
    )
    feature: str = field(
        default="auto",
        metadata=opt(
            "dataset to average: auto (default: cls4k, else features, else region_features), "
            "cls4k, mean256, concat, features, region_features",
            choices=SLIDE_FEATURES,
            metavar="NAME",
        ),
    )
    folds: int = field(default=10, metadata=opt("stratified cross-validation folds (default 10)"))
    k: int = field(default=5, metadata=opt("KNN neighbours (default 5, scikit-learn's as in HIPT)"))
    seed: int = field(default=0, metadata=opt("fold shuffling seed (default 0)"))
    logreg_c: float = field(
        default=1.0, metadata=opt("inverse L2 strength of the probe (default 1)")
    )
    out: str = field(
        default="pathflow_eval/slide_knn",
        metadata=opt("output folder (default pathflow_eval/slide_knn)", flags=("-o",)),
    )
    plot: bool = field(default=True, metadata=opt("write slide_knn.png (default on; --no-plot)"))

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("give one or more FEATURES folders (or .h5 files) to evaluate")
        for p in self.inputs:
            path = Path(p)
            if not path.is_dir() and not (path.is_file() and path.suffix == ".h5"):
                raise ConfigError(f"{p}: not a folder of .h5 feature files or an .h5 file")
        if not self.labels:
            raise ConfigError("give the slide labels: --labels slides.csv (columns slide,label)")
        if not Path(self.labels).is_file():
            raise ConfigError(f"{self.labels}: labels file not found")
        if self.feature not in FEATURE_CHOICES:
            raise ConfigError(f"--feature must be one of {', '.join(FEATURE_CHOICES)}, "
                              f"got {self.feature!r}")  # fmt: skip
        if self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1, got {self.k}")
        if not self.logreg_c > 0:
            raise ConfigError(f"--logreg-c must be > 0, got {self.logreg_c}")


@dataclass
class RetrievalConfig(YamlConfig):
    """Options of ``pathflow eval retrieval``."""

    _section = "retrieval"

    data: str = field(
        default="",
        metadata=opt("folder of images (searched recursively: .jpg, .jpeg, .png)", positional="1"),
    )
    arch: str = field(default="vit_small_patch16_224", metadata=opt("timm model name"))
    weights: str | None = field(
        default=None,
        metadata=opt(
            "our .safetensors export or a training checkpoint (default: none, the seeded random "
            "initialisation)"
        ),
    )
    pretrained: bool = field(default=False, metadata=opt("load timm's pretrained weights"))
    image_size: int | None = field(
        default=None, metadata=opt("view side in pixels (default: the model's)")
    )
    norm: str = field(
        default="auto", metadata=opt("normalisation, as in pathflow extract", choices=NORM_MODES)
    )
    views: str = field(default="simclr", metadata=opt("views preset: its first two views are used"))
    seed: int = field(default=0, metadata=opt("seed of the views and of a random initialisation"))
    max_images: int | None = field(
        default=None, metadata=opt("use the first N images (sorted paths)")
    )
    batch_size: int = field(default=64, metadata=opt("images per forward pass"))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda, cuda:1..."))
    out: str = field(
        default="pathflow_eval/retrieval", metadata=opt("output folder", flags=("-o",))
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("give a folder of images DATA")
        if self.norm not in NORM_MODES:
            raise ConfigError(f"--norm must be {one_of(NORM_MODES)}, got {self.norm!r}")
