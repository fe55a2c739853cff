"""Who is calling: a human-readable label for the current task or thread."""

from __future__ import annotations

import asyncio
import threading


def caller_label() -> str:
    """Return the current asyncio task's name, or the current thread's name outside a task."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop in this thread
        task = None
    if task is not None:
        return task.get_name()
    return threading.current_thread().name
