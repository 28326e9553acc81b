"""A producer in a background thread with a bounded queue (prefetching reads and decodes).

Example:
    >>> from pathflow.threads import background
    >>> list(background(iter(range(5)), depth=2))
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def background(items: Iterator[T], depth: int, name: str = "pathflow-prefetch") -> Iterator[T]:
    """Run ``items`` in a thread, ``depth`` items ahead; its errors are re-raised here, and
    when the consumer stops the producer stops too (and ``items`` is closed, so a generator's
    ``finally`` runs in the producer thread)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(msg: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # re-raised in the consumer
            put(("error", exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


__all__ = ["background"]
