"""The loader's pixel backends: one protocol and a registry (like timm's model registry).

A backend turns the loader's stream of :class:`~pathflow.data.batch.RawBatch` es (encoded
images plus every random view parameter, :class:`~pathflow.data.raw_batches.BatchSource`)
into :class:`~pathflow.data.batch.Batch` es of view tensors. Everything else (shard index,
epoch order, corrupt-sample screening, parameter draws, resume position) is the loader's, so
backends produce the same crops and colour changes for the same seed.

Built-in: ``torch`` (Rust decode + crop in DataLoader workers, fused Rust colour kernel on the
CPU or torch on the GPU) and ``dali`` (NVIDIA DALI, when installed). Adding one is a class with
``__init__(cfg, spec)``, ``iterate(source, start)`` and ``close()`` plus one
:func:`register_loader_backend` line; ``make_loader(..., backend=name)`` then uses it.

This module imports neither torch nor DALI (the built-ins are imported when created).

Example:
    >>> from pathflow.data.backends import list_loader_backends
    >>> list_loader_backends()[:2]
    ['torch', 'dali']
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pathflow.exceptions import BackendUnavailableError, InvalidArgumentError

if TYPE_CHECKING:
    from pathflow.data.batch import Batch
    from pathflow.data.raw_batches import BatchSource, LoaderConfig
    from pathflow.data.views import ViewsSpec

__all__ = [
    "LoaderBackend",
    "check_loader_backend",
    "create_loader_backend",
    "dali_available",
    "list_loader_backends",
    "loader_backend_available",
    "register_loader_backend",
]


@runtime_checkable
class LoaderBackend(Protocol):
    """What the loader needs from a backend (created once per loader, reused every epoch)."""

    def iterate(self, source: BatchSource, start: int) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of ``source`` (one epoch on one rank), in order.

        Each yielded batch keeps ``index``/``epoch``/``meta``/``skipped``/``no_partner`` of
        its raw batch (:meth:`Batch.from_raw <pathflow.data.batch.Batch.from_raw>`); a raw
        batch may be dropped only when ``source.raw_batches`` drops it.
        """
        ...

    def close(self) -> None:
        """Release threads, pipelines or device memory (the loader may create a new one)."""
        ...


#: ``(cfg, spec) -> backend``: a backend class, or any callable that builds one.
BackendFactory = Callable[["LoaderConfig", "ViewsSpec"], LoaderBackend]


def dali_available() -> bool:
    """True when NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Entry:
    factory: BackendFactory | str  # a callable, or "module:attribute" imported on first use
    available: Callable[[], bool] | None = None
    install: str = ""

    def load(self) -> BackendFactory:
        if isinstance(self.factory, str):
            module, _, attr = self.factory.partition(":")
            return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
        return self.factory


_REGISTRY: dict[str, _Entry] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


def register_loader_backend(
    name: str,
    factory: BackendFactory | str,
    *,
    available: Callable[[], bool] | None = None,
    install: str = "",
) -> Any:
    """Register (or replace) a loader backend under ``name``; returns ``factory``.

    Args:
        name: lower-case letters, digits, ``_`` or ``-`` (not ``auto``).
        factory: ``(cfg: LoaderConfig, spec: ViewsSpec) -> LoaderBackend`` (usually the
            class), or ``"module:attribute"`` to import it only when first created.
        available: says whether the backend's dependencies are installed (default: always).
        install: the error's text when it is not (``"needs X: pip install x"``).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "auto":
        raise InvalidArgumentError(
            f"invalid loader backend name {name!r}: use lower-case letters, digits, '_' or "
            "'-' (and not 'auto')"
        )
    if not (isinstance(factory, str) and ":" in factory) and not callable(factory):
        raise InvalidArgumentError(
            f"loader backend {name!r} must be a callable or 'module:attribute', got {factory!r}"
        )
    _REGISTRY[name] = _Entry(factory, available, install)
    return factory


def list_loader_backends(available_only: bool = False) -> list[str]:
    """Registered loader backend names (without ``auto``); only installed ones if
    ``available_only``."""
    return [n for n in _REGISTRY if not available_only or loader_backend_available(n)]


def loader_backend_available(name: str) -> bool:
    """Whether backend ``name`` is registered and its dependencies are installed."""
    entry = _REGISTRY.get(name)
    return entry is not None and (entry.available is None or entry.available())


def check_loader_backend(name: str) -> None:
    """Raise a one-line error unless ``name`` is a registered, installed backend."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        names = ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        raise InvalidArgumentError(f"backend must be one of {names}, got {name!r}")
    if entry.available is not None and not entry.available():
        raise BackendUnavailableError(f"backend={name!r} {entry.install or 'is not installed'}")


def create_loader_backend(name: str, cfg: LoaderConfig, spec: ViewsSpec) -> LoaderBackend:
    """A new backend ``name`` for a loader with config ``cfg`` and views ``spec``."""
    check_loader_backend(name)
    return _REGISTRY[name].load()(cfg, spec)


register_loader_backend("torch", "pathflow.data.torch_backend:TorchBackend")
register_loader_backend(
    "dali",
    "pathflow.data.dali_backend:DaliBackend",
    available=dali_available,
    install="needs NVIDIA DALI: pip install 'pathflow[gpu]'",
)
