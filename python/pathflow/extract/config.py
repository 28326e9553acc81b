"""Configuration of ``pathflow extract``: a dataclass <- YAML file <- CLI flags, saved as
``extract.yaml`` beside the features.

Example:
    >>> from pathflow.extract.config import ExtractConfig
    >>> cfg = ExtractConfig.build({}, {"inputs": ["run/shards"], "arch": "resnet50"})
    >>> cfg.format, cfg.features_dir, cfg.batch_size
    ('h5', 'features', 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError


@dataclass
class ModelOptions:
    """Backbone fields shared by ``pathflow extract`` and ``pathflow eval``."""

    arch: str | None = None
    weights: str | None = None
    pretrained: bool = False
    image_size: int | None = None
    norm: str = "auto"
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    compile: bool | None = None

    def resolved_precision(self) -> str:
        """``precision`` with ``auto`` resolved on this machine: bf16 where ``device`` is a
        GPU, else fp32 (``auto`` if the device cannot be resolved here)."""
        if self.precision != "auto":
            return self.precision
        from pathflow.extract.model import resolve_device

        try:
            return "bf16" if resolve_device(self.device).type == "cuda" else "fp32"
        except ConfigError:
            return self.precision

    def validate_model(self) -> None:
        if not self.arch:
            raise ConfigError("no backbone given (--arch NAME, a timm model name)")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"{self.weights}: weights file not found")
        if self.norm not in ("auto", "model", "imagenet", "hipt"):
            raise ConfigError(f"--norm must be auto, model, imagenet or hipt, got {self.norm!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 1 or self.workers < 1:
            raise ConfigError("--batch-size and --workers must be >= 1")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8, got {self.image_size}")


@dataclass
class ExtractConfig(ModelOptions, YamlConfig):
    """Everything ``pathflow extract`` needs; field names are the YAML keys."""

    _section = "extract"

    inputs: list[str] = field(default_factory=list)
    out: str = "pathflow_out"
    features_dir: str = "features"
    format: str = "h5"
    overwrite: bool = False
    #: ``patches``: one feature row per patch; ``regions``: HIPT's [G*G, D] ViT-256 grid per
    #: region (region shards); ``hipt``: regions + ViT-4K -> HIPT's region/slide descriptors
    model: str = "patches"
    arch_4k: str = "vit4k_xs"
    weights_4k: str | None = None
    keep_region_features: bool = False
    region_dtype: str = "float16"
    #: region coordinate inputs: slide folder (default: the files' ``slide_path``) and the
    #: sub-patch size
    slides: str | None = None
    region_patch: int = 256
    #: coordinate inputs: how patches are read from the slides and encoded before the model,
    #: as ``pathflow tile --shards`` encodes them (``--quality``, ``--transcode``, ``--format``)
    quality: int = 90
    transcode: str = "auto"
    patch_format: str = "jpg"
    #: many jobs: ``I/N`` or ``auto`` (job-array index); slides of other parts are left alone
    part: str | None = None
    #: ``local`` or ``dask`` (``scheduler`` / ``scheduler_file``, else a local cluster of
    #: ``dask_workers`` processes, 0: one per GPU or one); ``chunk_slides`` slides per task
    executor: str = "local"
    scheduler: str | None = None
    scheduler_file: str | None = None
    dask_workers: int = 0
    chunk_slides: int = 4

    def validate(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("no input given (shards folder, tile output folder or image folder)")
        if self.model in ("hipt", "regions") and not self.arch:
            self.arch = "vit_small_patch16_224"  # HIPT's ViT-256
        self.validate_model()
        if self.format not in ("h5", "pt"):
            raise ConfigError(f"--format must be h5 or pt, got {self.format!r}")
        if self.model not in ("patches", "regions", "hipt"):
            raise ConfigError(f"--model must be patches, regions or hipt, got {self.model!r}")
        if self.model != "patches" and self.format != "h5":
            raise ConfigError(f"--model {self.model} writes .h5 files only (not --format pt)")
        if self.weights_4k is not None and not Path(self.weights_4k).is_file():
            raise ConfigError(f"{self.weights_4k}: ViT-4K weights file not found")
        if self.weights_4k is not None and self.model != "hipt":
            raise ConfigError("--weights-4k needs --model hipt")
        if self.region_dtype not in ("float16", "float32"):
            raise ConfigError(
                f"--region-dtype must be float16 or float32, got {self.region_dtype!r}"
            )
        self.validate_jobs()
        if not self.features_dir or "/" in self.features_dir or self.features_dir in (".", ".."):
            raise ConfigError(f"--features-dir must be a plain folder name: {self.features_dir!r}")

    def validate_jobs(self) -> None:
        """Slide reading, ``--part`` and executor options."""
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in 1..100, got {self.quality}")
        if self.transcode not in ("auto", "always", "never"):
            raise ConfigError(f"--transcode must be auto, always or never, got {self.transcode!r}")
        if self.patch_format not in ("jpg", "png", "webp"):
            raise ConfigError(f"--patch-format must be jpg, png or webp, got {self.patch_format!r}")
        if self.part is not None:
            from pathflow.jobs.partition import parse_part

            parse_part(self.part)
        if self.executor not in ("local", "dask"):
            raise ConfigError(f"--executor must be local or dask, got {self.executor!r}")
        if (self.scheduler or self.scheduler_file) and self.executor != "dask":
            raise ConfigError("--scheduler / --scheduler-file need --executor dask")
        if self.scheduler and self.scheduler_file:
            raise ConfigError("give --scheduler or --scheduler-file, not both")
        if self.scheduler_file and not Path(self.scheduler_file).is_file():
            raise ConfigError(f"{self.scheduler_file}: scheduler file not found")
        if self.dask_workers < 0 or self.chunk_slides < 1:
            raise ConfigError("--dask-workers must be >= 0 and --chunk-slides >= 1")

    def features_key(self, from_slides: bool = False) -> dict[str, Any]:
        """The options that change the features written (or what a file holds), as given
        (``precision`` resolved, :meth:`resolved_precision`): a re-run into the same features
        folder with other values is refused unless ``overwrite``. ``from_slides``: the
        inputs are coordinate files read from the slides, where the reading options count
        too. (The weights file's content and the resolved mean/std are checked per slide
        file by the runner.)"""
        key: dict[str, Any] = {
            "arch": self.arch,
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "norm": self.norm,
            "precision": self.resolved_precision(),
            "format": self.format,
            "model": self.model,
        }
        if self.model != "patches":
            key["region_dtype"] = self.region_dtype
        if self.model == "hipt":
            key["arch_4k"] = self.arch_4k
            key["weights_4k"] = str(Path(self.weights_4k).resolve()) if self.weights_4k else None
            key["keep_region_features"] = self.keep_region_features
        if from_slides:
            key.update(quality=self.quality, transcode=self.transcode,
                       patch_format=self.patch_format)  # fmt: skip
            if self.model != "patches":
                key["region_patch"] = self.region_patch
        return key

    def model_key(self) -> dict[str, Any]:
        """The model's setup (a worker process's cached models are keyed by it). What a
        re-run must not change is :meth:`features_key`; the weights file's content (sha256)
        and the resolved mean/std are checked per slide file by the runner."""
        return {
            "arch": self.arch,
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "model": self.model,
            "weights_4k": str(Path(self.weights_4k).resolve()) if self.weights_4k else None,
        }
