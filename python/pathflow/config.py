"""Typed configuration for every command: dataclass <- YAML file <- CLI flags.

One helper for ``pathflow tile``, ``train``, ``extract`` and ``eval``. Every value read from a
YAML file or given on the command line is converted to its field's type, and a bad value is
reported in one line naming the file (or flag) and the option. PyYAML reads YAML 1.1, where
``5e-4`` (no dot) is a *string*; here it becomes the float the user meant.

Example:
    >>> from dataclasses import dataclass
    >>> from pathflow.config import YamlConfig, coerce
    >>> coerce("5e-4", float, "lr")
    0.0005
    >>> coerce("1e3", int | None, "steps")
    1000
    >>> @dataclass
    ... class Opts(YamlConfig):
    ...     lr: float = 1e-3
    ...     steps: int | None = None
    >>> Opts.build({"lr": 5e-4}, {"steps": "10"})  # YAML values come typed (from_yaml)
    Opts(lr=0.0005, steps=10)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pathflow.exceptions import ConfigError

T = TypeVar("T", bound="YamlConfig")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _optional_args(annotation: Any) -> tuple[list[Any], bool]:
    """``X | None`` -> ([X], True); ``X`` -> ([X], False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(annotation))
        none = type(None) in args
        return [a for a in args if a is not type(None)], none
    return [annotation], False


def scalar_type(annotation: Any) -> Any:
    """The type an argparse flag converts to: ``int | None`` -> ``int``, ``list[float]`` ->
    ``float``."""
    args, _ = _optional_args(annotation)
    inner = args[0] if len(args) == 1 else str
    if typing.get_origin(inner) in (list, tuple):
        sub = typing.get_args(inner)
        return sub[0] if sub else str
    return inner


def is_list(annotation: Any) -> bool:
    args, _ = _optional_args(annotation)
    return len(args) == 1 and typing.get_origin(args[0]) in (list, tuple)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` to the type ``annotation`` (``int``, ``float``, ``bool``, ``str``,
    ``list[X]``, ``X | None``, ``Any``); raise :class:`ConfigError` naming ``where``."""
    args, optional = _optional_args(annotation)
    if value is None or (isinstance(value, str) and optional and value.lower() in ("none", "null")):
        if optional or annotation is Any:
            return None
        raise ConfigError(f"{where}: a value is required, got null")
    if len(args) != 1:
        return value
    kind = args[0]
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        sub = typing.get_args(kind)
        item = sub[0] if sub else Any
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, item, where) for v in items]
    if kind is Any or origin is dict or kind is dict:
        return value
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            number = float(value) if isinstance(value, (str, float)) else None
            if number is None or not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {_NAMES.get(kind, kind)}, got {value!r}") from None
    return value


def read_yaml(path: str | os.PathLike[str], section: str = "") -> dict[str, Any]:
    """The mapping in a YAML file (its ``section:`` mapping when there is one), keys with
    dashes turned into underscores."""
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
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class YamlConfig:
    """Dataclass mixin: typed YAML load (unknown keys rejected), CLI merge, atomic save.

    Subclasses set ``_section`` (a YAML file may hold ``tile:``, ``train:``... sections) and
    override :meth:`finish` (validate / resolve after :meth:`build`).
    """

    _section: ClassVar[str] = ""

    def finish(self: T, explicit: set[str]) -> T:
        """Called by :meth:`build` with the names set by YAML or CLI; returns the final
        config (default: :meth:`validate`, then ``self``)."""
        self.validate()
        return self

    def validate(self) -> None:
        """Raise :class:`ConfigError` on bad values."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the YAML written beside outputs)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.name.startswith("_")
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as YAML (atomically)."""
        import yaml

        from pathflow.outputs import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_names(cls) -> list[str]:
        return [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.name.startswith("_")
        ]

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Field name -> evaluated type annotation."""
        return typing.get_type_hints(cls)

    @classmethod
    def coerce_values(cls, values: dict[str, Any], source: str = "") -> dict[str, Any]:
        """Convert known fields to their types; unknown names are an error."""
        types_ = cls.field_types()
        known = set(cls.field_names())
        out: dict[str, Any] = {}
        for name, value in values.items():
            where = f"{source}: {name}" if source else f"--{name.replace('_', '-')}"
            if name not in known:
                raise ConfigError(f"{source or 'options'}: unknown option {name!r}")
            out[name] = coerce(value, types_[name], where)
        return out

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a YAML file (optionally under ``_section:``) into typed known fields."""
        return cls.coerce_values(read_yaml(path, cls._section), str(path))

    @classmethod
    def build(cls: type[T], yaml_values: dict[str, Any], cli_values: dict[str, Any]) -> T:
        """Defaults <- YAML <- CLI (only options given on the command line), typed, then
        :meth:`finish`."""
        merged = {**yaml_values, **cls.coerce_values(cli_values)}
        try:
            cfg = cls(**merged)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
        return cfg.finish(set(merged))


__all__ = ["YamlConfig", "coerce", "is_list", "read_yaml", "scalar_type"]
