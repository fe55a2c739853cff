"""The observer list both locks keep: add, remove and deliver :class:`~chatkit.LockEvent` records.

A lock holds its observers as an immutable tuple and replaces it on every change, so delivering events
never needs the lock's guard and an observer added meanwhile never sees half a list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .keyed import LockEvent

__all__ = ["Observer", "with_observer", "without_observer", "emit"]

logger = logging.getLogger("chatkit.locks")

Observer = Callable[["LockEvent"], object]


def with_observer(observers: tuple[Observer, ...], observer: object) -> tuple[Observer, ...]:
    """``observers`` plus ``observer``.

    Raises:
        TypeError: ``observer`` is not callable.
    """
    if not callable(observer):
        raise TypeError(f"observer must be callable, got {observer!r}")
    return (*observers, observer)


def without_observer(observers: tuple[Observer, ...], observer: object) -> tuple[Observer, ...]:
    """``observers`` without (the first occurrence of) ``observer``.

    Raises:
        ValueError: it is not among them.
    """
    remaining = list(observers)
    try:
        remaining.remove(observer)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{observer!r} is not an observer of this lock") from None
    return tuple(remaining)


def emit(observers: tuple[Observer, ...], events: Iterable[LockEvent], lock: object) -> None:
    """Deliver each event to each observer; an observer's exception is logged and never breaks locking."""
    for observer in observers:
        for event in events:
            try:
                observer(event)
            except Exception:  # an observer must never break locking
                logger.exception("%s observer %r failed on %r", type(lock).__name__, observer, event)
