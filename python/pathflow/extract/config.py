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

from pathflow.choices import (
    EXECUTORS,
    EXTRACT_MODELS,
    FEATURE_FORMATS,
    IMAGE_FORMATS,
    INFERENCE_PRECISIONS,
    NORM_MODES,
    REGION_DTYPES,
    TRANSCODE_MODES,
    one_of,
)
from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError
from pathflow.options import opt

_BACKBONE = "backbone"
_HIPT = "HIPT regions (input: pathflow tile --shards --region R --region-patches)"
_COORDS = (
    "coordinates + slides (input: tile output without shards, its coords/, CLAM's "
    "patches/*.h5; --slides DIR)"
)
_JOBS = "many jobs / a cluster"


@dataclass
class ModelOptions:
    """Backbone fields shared by ``pathflow extract`` and ``pathflow eval``."""

    arch: str | None = field(
        default=None,
        metadata=opt(
            "timm model name (e.g. vit_small_patch16_224, resnet50) or resnet50_trunc (CLAM's "
            "1024-d ResNet-50)",
            group=_BACKBONE,
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=opt(
            "our .safetensors export or a training/DINO/HIPT checkpoint (with --model hipt: "
            "the ViT-256's, e.g. HIPT's vit256_small_dino.pth)",
            flags=("--weights-256",),
            group=_BACKBONE,
        ),
    )
    pretrained: bool = field(
        default=False,
        metadata=opt("load timm's pretrained weights (downloaded or cached)", group=_BACKBONE),
    )
    image_size: int | None = field(
        default=None, metadata=opt("input side in pixels (default: the model's)", group=_BACKBONE)
    )
    norm: str = field(
        default="auto",
        metadata=opt(
            "normalisation: auto (default: the model's own mean/std with --pretrained or as "
            "recorded in --weights, else ImageNet's; with --model regions/hipt, HIPT's), model, "
            "imagenet, hipt (mean = std = 0.5, HIPT's inference)",
            choices=NORM_MODES,
            group=_BACKBONE,
        ),
    )
    batch_size: int = field(
        default=64, metadata=opt("images per forward pass (default 64)", group=_BACKBONE)
    )
    workers: int = field(
        default=2, metadata=opt("read/decode threads (default 2)", group=_BACKBONE)
    )
    device: str = field(
        default="auto",
        metadata=opt("auto (default: cuda if available), cpu, cuda, cuda:1...", group=_BACKBONE),
    )
    precision: str = field(
        default="auto",
        metadata=opt(
            "auto (default: bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 (also on CPUs with "
            "bf16 matrix units)",
            choices=INFERENCE_PRECISIONS,
            group=_BACKBONE,
        ),
    )
    compile: bool | None = field(
        default=None, metadata=opt("torch.compile the backbone (default: on CUDA)", group=_BACKBONE)
    )

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
        if self.norm not in NORM_MODES:
            raise ConfigError(f"--norm must be {one_of(NORM_MODES)}, got {self.norm!r}")
        if self.precision not in INFERENCE_PRECISIONS:
            raise ConfigError(
                f"--precision must be {one_of(INFERENCE_PRECISIONS)}, got {self.precision!r}"
            )
        if self.batch_size < 1 or self.workers < 1:
            raise ConfigError("--batch-size and --workers must be >= 1")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8, got {self.image_size}")


@dataclass
class ExtractConfig(ModelOptions, YamlConfig):
    """Everything ``pathflow extract`` needs; field names are the YAML keys."""

    _section = "extract"

    inputs: list[str] = field(
        default_factory=list,
        metadata=opt(
            "shards folders, tile output folders, coordinate files/folders (coords/, CLAM's "
            "patches/) or image folders",
            positional="*",
        ),
    )
    out: str = field(
        default="pathflow_out", metadata=opt("output folder (default: pathflow_out)", flags=("-o",))
    )
    features_dir: str = field(
        default="features", metadata=opt("sub-folder of --out for the files (default features)")
    )
    format: str = field(
        default="h5", metadata=opt("h5 (default) or pt (CLAM pt_files)", choices=FEATURE_FORMATS)
    )
    overwrite: bool = field(
        default=False,
        metadata=opt(
            "redo slides whose features file exists (needed to re-run a features folder with "
            "options that change the features)"
        ),
    )
    #: ``patches``: one feature row per patch; ``regions``: HIPT's [G*G, D] ViT-256 grid per
    #: region (region shards); ``hipt``: regions + ViT-4K -> HIPT's region/slide descriptors
    model: str = field(
        default="patches",
        metadata=opt(
            "patches (default): a feature row per patch; regions: each region's grid of "
            "ViT-256 [CLS] features, region_features [M, G*G, D] float16 (ViT-4K pretraining "
            "data); hipt: + ViT-4K -> cls4k, mean256, concat per region and the slide means",
            choices=EXTRACT_MODELS,
            group=_HIPT,
        ),
    )
    arch_4k: str = field(
        default="vit4k_xs",
        metadata=opt("region model (default vit4k_xs, HIPT's ViT-4K)", group=_HIPT),
    )
    weights_4k: str | None = field(
        default=None,
        metadata=opt(
            "ViT-4K weights: a pathflow export/checkpoint of train --method hipt4k, or HIPT's "
            "vit4k_xs_dino.pth (default: random init)",
            group=_HIPT,
        ),
    )
    keep_region_features: bool = field(
        default=False, metadata=opt("with --model hipt, also store region_features", group=_HIPT)
    )
    region_dtype: str = field(
        default="float16",
        metadata=opt(
            "dtype of region_features (default float16)", choices=REGION_DTYPES, group=_HIPT
        ),
    )
    #: region coordinate inputs: slide folder (default: the files' ``slide_path``) and the
    #: sub-patch size
    slides: str | None = field(
        default=None,
        metadata=opt(
            "with coordinate inputs (pathflow tile output without --shards, its coords/, or "
            "CLAM patches/*.h5): folder of the slides, found by file stem (default: the "
            "coordinate files' slide_path)",
            group=_HIPT,
        ),
    )
    region_patch: int = field(
        default=256,
        metadata=opt(
            "sub-patch size of regions read from coordinates + slides (default 256)", group=_HIPT
        ),
    )
    #: coordinate inputs: how patches are read from the slides and encoded before the model,
    #: as ``pathflow tile --shards`` encodes them (``--quality``, ``--transcode``, ``--format``)
    quality: int = field(
        default=90,
        metadata=opt(
            "JPEG quality of patches read from slides, as tile --shards encodes them (default 90)",
            group=_COORDS,
        ),
    )
    transcode: str = field(
        default="auto",
        metadata=opt(
            "native JPEG tiles passed through where the grid lines up (auto, default), as "
            "tile --shards",
            choices=TRANSCODE_MODES,
            group=_COORDS,
        ),
    )
    patch_format: str = field(
        default="jpg",
        metadata=opt(
            "encoding of patches read from slides, as tile --shards --format (jpg)",
            choices=IMAGE_FORMATS,
            group=_COORDS,
        ),
    )
    #: many jobs: ``I/N`` or ``auto`` (job-array index); slides of other parts are left alone
    part: str | None = field(
        default=None,
        metadata=opt(
            "I/N (0-based) or auto (SLURM/PBS/LSF array, Kubernetes indexed job): only the "
            "slides of that part (hash of the slide id)",
            group=_JOBS,
        ),
    )
    #: ``local`` or ``dask`` (``scheduler`` / ``scheduler_file``, else a local cluster of
    #: ``dask_workers`` processes, 0: one per GPU or one); ``chunk_slides`` slides per task
    executor: str = field(
        default="local",
        metadata=opt(
            "local (default) or dask: chunks of slides per task, one model per worker",
            choices=EXECUTORS,
            group=_JOBS,
        ),
    )
    scheduler: str | None = field(
        default=None,
        metadata=opt(
            "Dask scheduler address tcp://HOST:PORT (default: a local cluster on 127.0.0.1)",
            group=_JOBS,
        ),
    )
    scheduler_file: str | None = field(
        default=None,
        metadata=opt(
            "Dask scheduler file (dask scheduler --scheduler-file, dask-jobqueue)", group=_JOBS
        ),
    )
    dask_workers: int = field(
        default=0,
        metadata=opt(
            "worker processes of the local cluster (default: one per GPU, else 1)", group=_JOBS
        ),
    )
    chunk_slides: int = field(
        default=4, metadata=opt("slides per Dask task (default 4)", group=_JOBS)
    )

    def validate(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("no input given (shards folder, tile output folder or image folder)")
        if self.model in ("hipt", "regions") and not self.arch:
            self.arch = "vit_small_patch16_224"  # HIPT's ViT-256
        self.validate_model()
        if self.format not in FEATURE_FORMATS:
            raise ConfigError(f"--format must be {one_of(FEATURE_FORMATS)}, got {self.format!r}")
        if self.model not in EXTRACT_MODELS:
            raise ConfigError(f"--model must be {one_of(EXTRACT_MODELS)}, got {self.model!r}")
        if self.model != "patches" and self.format != "h5":
            raise ConfigError(f"--model {self.model} writes .h5 files only (not --format pt)")
        if self.weights_4k is not None and not Path(self.weights_4k).is_file():
            raise ConfigError(f"{self.weights_4k}: ViT-4K weights file not found")
        if self.weights_4k is not None and self.model != "hipt":
            raise ConfigError("--weights-4k needs --model hipt")
        if self.region_dtype not in REGION_DTYPES:
            raise ConfigError(
                f"--region-dtype must be {one_of(REGION_DTYPES)}, got {self.region_dtype!r}"
            )
        self.validate_jobs()
        if not self.features_dir or "/" in self.features_dir or self.features_dir in (".", ".."):
            raise ConfigError(f"--features-dir must be a plain folder name: {self.features_dir!r}")

    def validate_jobs(self) -> None:
        """Slide reading, ``--part`` and executor options."""
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be in 1..100, got {self.quality}")
        if self.transcode not in TRANSCODE_MODES:
            raise ConfigError(
                f"--transcode must be {one_of(TRANSCODE_MODES)}, got {self.transcode!r}"
            )
        if self.patch_format not in IMAGE_FORMATS:
            raise ConfigError(
                f"--patch-format must be {one_of(IMAGE_FORMATS)}, got {self.patch_format!r}"
            )
        if self.part is not None:
            from pathflow.jobs.partition import parse_part

            parse_part(self.part)
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be {one_of(EXECUTORS)}, got {self.executor!r}")
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
