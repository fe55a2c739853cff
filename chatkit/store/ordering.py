"""Per-source publish order without a lock held across the embedding: tickets taken at call time.

A write takes a :class:`Ticket` for its sources the moment it is called (before it embeds anything), and
waits for its *turn* only when it is ready to publish. Its turn comes when every earlier ticket for any of
its sources has finished (published, failed or been cancelled). Writes to one source therefore publish in
call order, while their embeddings run in parallel and nobody holds anything during an embedding.

Invariants:

* One ``threading.Lock`` (the guard) protects the queues; nobody waits or runs user code while holding it.
  Async writers (on any event loop) and plain threads share one order.
* Each key has a FIFO queue of the unfinished tickets that name it (an ``OrderedDict``: O(1) append, O(1)
  removal from anywhere); a key with one ticket stores the ticket alone (no queue object: a batch of
  thousands of new sources costs one dict entry each). A multi-key ticket joins all its queues in one step
  under the guard, so any two tickets are in the same relative order in every queue they share: no
  deadlock.
* ``ticket.blocked`` counts the queues in which the ticket is not at the head; its turn has come exactly
  when it is 0. Finishing a ticket decrements the count of each new head, so every operation costs
  O(keys of the ticket), whatever the batch sizes.
* The turn is decided under the guard (``ticket.turn``); waking a waiter (a ``threading.Event``, or a
  future on its loop) only tells it to look.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable

__all__ = ["Ticket", "WriteOrder"]


class Ticket:
    """One write's place in the order of each of its keys (see :class:`WriteOrder`)."""

    __slots__ = ("keys", "blocked", "turn", "finished", "event", "loop", "future")

    def __init__(self, keys: tuple[Hashable, ...]) -> None:
        self.keys = keys
        self.blocked = 0  # queues in which an earlier ticket is still unfinished
        self.turn = False
        self.finished = False
        self.event: threading.Event | None = None  # a waiting thread
        self.loop: asyncio.AbstractEventLoop | None = None  # a waiting task: its loop and future
        self.future: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "finished" if self.finished else "its turn" if self.turn else f"behind {self.blocked} queue(s)"
        return f"<Ticket {list(self.keys)[:3]!r}{'...' if len(self.keys) > 3 else ''}: {state}>"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class WriteOrder:
    """Per-key FIFO order of writes: :meth:`take` at call time, :meth:`wait` / :meth:`wait_async` for the
    turn, :meth:`finish` when done (always, in a ``finally``).

    Example:
        >>> order = WriteOrder()
        >>> first, second = order.take(["a.md"]), order.take(["a.md", "b.md"])
        >>> first.turn, second.turn
        (True, False)
        >>> order.finish(first)
        >>> second.turn, order.pending("a.md")
        (True, 1)
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        # key -> its only unfinished ticket, or the FIFO queue of them; absent when none
        self._queues: dict[Hashable, Ticket | OrderedDict[Ticket, None]] = {}

    def __repr__(self) -> str:
        tickets = {t for q in list(self._queues.values()) for t in ((q,) if isinstance(q, Ticket) else q)}
        return f"<WriteOrder keys={len(self._queues)} tickets={len(tickets)}>"

    def pending(self, key: Hashable) -> int:
        """How many unfinished tickets name ``key``."""
        q = self._queues.get(key)
        return 0 if q is None else 1 if isinstance(q, Ticket) else len(q)

    def busy(self) -> bool:
        """Whether any ticket is unfinished."""
        return bool(self._queues)

    def take(self, keys: Iterable[Hashable]) -> Ticket:
        """A ticket behind every unfinished ticket that shares a key with it (keys are de-duplicated)."""
        ticket = Ticket(tuple(dict.fromkeys(keys)))
        with self._guard:
            queues = self._queues
            blocked = 0
            for key in ticket.keys:
                q = queues.setdefault(key, ticket)
                if q is ticket:
                    continue
                blocked += 1
                if type(q) is Ticket:
                    queues[key] = OrderedDict(((q, None), (ticket, None)))
                else:
                    q[ticket] = None  # type: ignore[index]
            ticket.blocked = blocked
            ticket.turn = blocked == 0
        return ticket

    def wait(self, ticket: Ticket) -> None:
        """Block this thread until it is ``ticket``'s turn."""
        with self._guard:
            if ticket.turn:
                return
            ticket.event = threading.Event()
        ticket.event.wait()

    async def wait_async(self, ticket: Ticket) -> None:
        """Wait (without blocking the loop) until it is ``ticket``'s turn. Cancellable: the caller's
        ``finally`` must still :meth:`finish` the ticket."""
        loop = asyncio.get_running_loop()
        with self._guard:
            if ticket.turn:
                return
            ticket.loop, ticket.future = loop, loop.create_future()
        await ticket.future

    def finish(self, ticket: Ticket) -> None:
        """Leave every queue (idempotent); hand the turn to the tickets that were waiting only for this one."""
        woken: list[Ticket] = []
        with self._guard:
            if ticket.finished:
                return
            ticket.finished = True
            queues = self._queues
            for key in ticket.keys:
                q = queues[key]
                if q is ticket:
                    del queues[key]
                    continue
                assert type(q) is OrderedDict
                was_head = next(iter(q)) is ticket
                del q[ticket]
                if not q:
                    del queues[key]
                elif was_head:
                    head = next(iter(q))
                    head.blocked -= 1
                    if head.blocked == 0:
                        head.turn = True
                        woken.append(head)
            wake = [(t, t.event, t.loop, t.future) for t in woken]
        for t, event, loop, future in wake:
            if event is not None:
                event.set()
            elif loop is not None and future is not None:
                try:
                    loop.call_soon_threadsafe(_resolve, future)
                except RuntimeError:  # its loop is closed: that writer will never publish; pass the turn on
                    self.finish(t)
