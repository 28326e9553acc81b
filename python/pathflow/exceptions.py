"""Exception tree of pathflow.

Every error that pathflow raises on purpose derives from :class:`PathflowError`, so a batch
driver can catch one type. Errors raised by the Rust core (``pathflow._core``) are mapped onto
this tree; I/O errors keep their builtin types (``FileNotFoundError``, ``PermissionError``...).

Example:
    >>> from pathflow.exceptions import PathflowError, SlideError
    >>> issubclass(SlideError, PathflowError)
    True
"""

from __future__ import annotations


class PathflowError(Exception):
    """Base class of all pathflow errors."""


class InvalidArgumentError(PathflowError, ValueError):
    """A parameter is out of range or inconsistent (bad kernel size, empty image...)."""


class ConfigError(InvalidArgumentError):
    """A configuration file or CLI option is invalid."""


class SlideError(PathflowError):
    """A slide cannot be used. The message names the file and the problem."""


class UnsupportedFormatError(SlideError):
    """No reader backend can open this file."""


class CorruptSlideError(SlideError):
    """The file is recognised but truncated or damaged."""


class CorruptShardError(PathflowError):
    """A WebDataset shard is truncated or does not match its index (``.idx``, ``shards.json``).
    The message names the file and the problem."""


class MissingMppError(SlideError):
    """The slide has no plausible microns-per-pixel value and none was given."""


class BackendUnavailableError(PathflowError, ImportError):
    """A requested reader backend (openslide, cucim, tiffslide) is not installed."""


class MaskError(PathflowError):
    """A user-supplied mask (PNG or GeoJSON) cannot be used for a slide."""


class SampleDataError(PathflowError):
    """A sample slide could not be obtained (no pip, no network, bad checksum)."""


__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "CorruptShardError",
    "CorruptSlideError",
    "InvalidArgumentError",
    "MaskError",
    "MissingMppError",
    "PathflowError",
    "SampleDataError",
    "SlideError",
    "UnsupportedFormatError",
]
