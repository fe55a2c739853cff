"""Helpers for lock tests: an observer that lets a test wait for a request's events, and a gated holder."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Hashable
from typing import Any

from chatkit import LockEvent

WAIT = 30.0  # generous: an event that does not come within this is a failure, not a slow machine


class Watch:
    """An observer that records every event and lets a test wait until ``label`` reached ``kind``."""

    def __init__(self) -> None:
        self.events: list[LockEvent] = []
        self._seen: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)

    def __call__(self, event: LockEvent) -> None:
        self.events.append(event)
        self._seen[(event.label, event.kind)].set()

    async def until(self, label: str, kind: str) -> None:
        await asyncio.wait_for(self._seen[(label, kind)].wait(), WAIT)

    def kinds(self, label: str) -> list[str]:
        return [e.kind for e in self.events if e.label == label]


class Holder:
    """A task that takes ``keys`` and holds them until :meth:`release`; records its token."""

    def __init__(self, lock: Any, *keys: Hashable, label: str, record: list[str] | None = None, **kw: Any) -> None:
        self.inside = asyncio.Event()
        self._release = asyncio.Event()
        self.token: int | None = None
        self.record = record
        self.label = label
        self.task = asyncio.create_task(self._run(lock, keys, kw), name=label)

    async def _run(self, lock: Any, keys: tuple[Hashable, ...], kw: dict[str, Any]) -> None:
        request = lock(*keys, label=self.label, **kw)
        async with request:
            self.token = request.token
            if self.record is not None:
                self.record.append(self.label)
            self.inside.set()
            await self._release.wait()

    async def entered(self) -> None:
        await asyncio.wait_for(self.inside.wait(), WAIT)

    def release(self) -> None:
        self._release.set()

    async def done(self) -> None:
        """Release and wait for the task to finish (re-raising what it raised)."""
        self._release.set()
        await asyncio.wait_for(self.task, WAIT)
