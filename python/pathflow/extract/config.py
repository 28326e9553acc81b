"""Configuration of ``pathflow extract``: a dataclass <- YAML file <- CLI flags, saved as
``extract.yaml`` beside the features.

Example:
    >>> from pathflow.extract.config import ExtractConfig
    >>> cfg = ExtractConfig.build({}, {"inputs": ["run/shards"], "arch": "resnet50"})
    >>> cfg.format, cfg.features_dir, cfg.batch_size
    ('h5', 'features', 64)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from pathflow.exceptions import ConfigError

T = TypeVar("T", bound="YamlConfig")


class YamlConfig:
    """Dataclass mixin: YAML load (unknown keys rejected), CLI merge, atomic save."""

    _section = ""

    def validate(self) -> None:  # pragma: no cover - overridden
        """Raise :class:`ConfigError` on bad values."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the YAML written beside outputs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as YAML (atomically)."""
        import yaml

        from pathflow.outputs import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a YAML file (optionally with a top-level section) into known fields."""
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
        if cls._section and isinstance(data.get(cls._section), dict):
            data = data[cls._section]
        known = set(cls.field_names())
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{p}: unknown option {key!r}")
            out[name] = value
        return out

    @classmethod
    def build(cls: type[T], yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> T:
        """Defaults <- YAML <- CLI (only options given on the command line), validated."""
        merged = {**yaml_values, **cli_values}
        try:
            cfg = cls(**merged)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
        cfg.validate()
        return cfg


@dataclass
class ModelOptions:
    """Backbone fields shared by ``pathflow extract`` and ``pathflow eval``."""

    arch: str | None = None
    weights: str | None = None
    pretrained: bool = False
    image_size: int | None = None
    norm: str = "imagenet"
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"

    def validate_model(self) -> None:
        if not self.arch:
            raise ConfigError("no backbone given (--arch NAME, a timm model name)")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"{self.weights}: weights file not found")
        if self.norm not in ("imagenet", "model"):
            raise ConfigError(f"--norm must be imagenet or model, got {self.norm!r}")
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

    def validate(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("no input given (shards folder, tile output folder or image folder)")
        self.validate_model()
        if self.format not in ("h5", "pt"):
            raise ConfigError(f"--format must be h5 or pt, got {self.format!r}")
        if not self.features_dir or "/" in self.features_dir or self.features_dir in (".", ".."):
            raise ConfigError(f"--features-dir must be a plain folder name: {self.features_dir!r}")

    def model_key(self) -> dict[str, Any]:
        """What must not change between a run and its resumption in the same folder."""
        return {
            "arch": self.arch,
            "weights": str(Path(self.weights).resolve()) if self.weights else None,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
            "norm": self.norm,
        }
