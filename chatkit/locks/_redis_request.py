"""One request of a :class:`~chatkit.RedisKeyedLock`: the context manager, its ticket, and its holder.

Its life: *new* -> *waiting* (its ticket joined the queues; woken by a grant message, or by a re-check
when a ticket ahead may have died, or by its timeout) -> *holding* (the block runs; the lease is renewed
by the lock's background task) -> *releasing* -> *done*. A waiter that times out, is cancelled or fails
goes from *waiting* to *done*, taking its ticket out of Redis. Whether it holds the keys is decided by
Redis (a script's answer), never by a message alone arriving first.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from .._labels import caller_label
from ..errors import LockLost, LockQueueFull, LockServerUnavailable, LockTimeout
from . import _redis_scripts as scripts
from .keyed import LockEvent

if TYPE_CHECKING:
    from .redis import RedisKeyedLock

__all__ = ["RedisLockRequest", "describe", "NEW", "WAITING", "HOLDING", "RELEASING", "DONE"]

logger = logging.getLogger("chatkit.locks.redis")

EventKind = Literal["requested", "acquired", "released", "timed_out", "cancelled", "rejected"]
NEW, WAITING, HOLDING, RELEASING, DONE = "new", "waiting", "holding", "releasing", "done"
SAFETY = 0.9  # a request counts its lease as gone after this share of it without a renewal


def describe(keys: tuple[Hashable, ...]) -> str:
    return f"key {keys[0]!r}" if len(keys) == 1 else f"keys {list(keys)!r}"


class RedisLockRequest:
    """One acquisition: the context manager, the ticket in Redis, and (once granted) the holder."""

    def __init__(
        self,
        lock: RedisKeyedLock,
        keys: tuple[Hashable, ...],
        names: tuple[str, ...],
        timeout: float | None,
        label: str | None,
    ) -> None:
        self.lock = lock
        self.keys = keys
        self.names = names
        self.timeout = timeout
        self.label = label
        self.label_text = label or "?"
        self.state = NEW
        self.ticket = ""
        self.record = ""
        self._token: int | None = None
        self.granted_token: int | None = None
        self.owner: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None  # a waiter's failure (lost its place, server unreachable)
        self.lost: LockLost | None = None  # a holder's lost lease
        self.cancelled_by_lock = False
        self.recheck_due = False
        self.confirmed = False  # its ticket exists in Redis (the join script answered)
        self.sent = 0.0  # loop time the join script was sent
        self.deadline = math.inf  # loop time its lease is considered gone without a renewal
        self.watchdog: asyncio.TimerHandle | None = None
        self.poke: asyncio.Future[None] | None = None
        self._joined = asyncio.Event()  # set once the join script answered (or the request failed before)
        self.t_request = 0.0
        self.t_acquired = 0.0

    @property
    def token(self) -> int | None:
        """The fencing token of this acquisition once entered (grows with every acquisition of a key)."""
        return self._token

    async def joined(self) -> bool:
        """Wait until this request's ticket is in the key queues in Redis; return whether it got there.

        ``False``: the request failed or was cancelled before its ticket joined (or it was never entered).
        """
        await self._joined.wait()
        return self.confirmed

    def __repr__(self) -> str:
        token = "" if self._token is None else f" token={self._token}"
        return f"<redis lock request for {describe(self.keys)} by {self.label_text!r}: {self.state}{token}>"

    # ------------------------------------------------------------ lease bookkeeping

    def extend(self, sent: float) -> None:
        """A renewal (or the join) sent at loop time ``sent`` succeeded: the lease lasts from then."""
        lock = self.lock
        assert lock._loop is not None
        deadline = sent + lock._lease * SAFETY
        if deadline <= self.deadline and self.watchdog is not None:
            return
        self.deadline = deadline
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.watchdog = lock._loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self.watchdog = None
        if self.state in (WAITING, HOLDING):
            self.lock._lose(self, "expired", None)

    def cancel_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def wake(self) -> None:
        poke = self.poke
        if poke is not None and not poke.done():
            poke.set_result(None)

    # ------------------------------------------------------------ acquiring

    def __aenter__(self) -> Awaitable[None]:
        if self.state != NEW:
            raise RuntimeError("this lock request was already used; call lock(key) again for a new one")
        self.state = WAITING
        return self._acquire()

    def _event(self, kind: EventKind, now: float, waited: float | None = None, held: float | None = None) -> LockEvent:
        return LockEvent(kind, self.keys, self.label_text, now, waited, held)

    async def _acquire(self) -> None:
        try:
            await self._acquire_keys()
        finally:
            self._joined.set()

    async def _acquire_keys(self) -> None:
        lock = self.lock
        lock_clock = lock._clock
        self.t_request = lock_clock()
        self.owner = asyncio.current_task()
        if self.label is None:
            self.label_text = caller_label()
        # Re-entry by the task that holds one of these keys would wait for itself forever.
        for n in self.names:
            st = lock._local.get(n)
            if st is not None and st.holder is not None and self.owner is not None and st.holder.owner is self.owner:
                self.state = DONE
                raise RuntimeError(
                    f"{self.label_text!r} already holds {describe(st.holder.keys)} and asked for "
                    f"{describe(self.keys)}, which would deadlock: release it first"
                )
        try:
            await lock._ensure_started()
        except BaseException:
            self.state = DONE
            raise
        loop = lock._loop
        assert loop is not None
        t_loop = loop.time()
        self.ticket = f"{lock._id}:{next(lock._seq)}"
        self.record = f"{lock._namespace}:t:{self.ticket}"
        lock._tickets[self.ticket] = self
        lock._local_enter(self)
        try:
            joined = lock._enqueue(self)
            try:
                reply = await asyncio.shield(joined)
            except asyncio.CancelledError:
                # The join may run yet: wait for its answer, so that leaving comes after it.
                await _finish_uncancellable(joined)
                self.confirmed = joined.done() and not joined.cancelled() and joined.exception() is None
                raise
            status = int(reply[0])
            if status == -1:
                full = self.keys[int(reply[1]) - 1]
                self._finish_waiting("rejected", lock_clock())
                raise LockQueueFull(
                    f"too many requests are already waiting for key {full!r} (max_pending={lock._max_pending}, "
                    "counted across all processes); try again later",
                    key=full,
                    max_pending=lock._max_pending or 0,
                )
            self.confirmed = True
            self._joined.set()
            self.extend(self.sent)
            if lock._observers:
                lock._emit([self._event("requested", self.t_request)])
            if status == 1:
                self.granted_token = int(reply[1])
            else:
                await self._wait(int(reply[1]), t_loop)
        except asyncio.CancelledError:
            await self._leave_cancelled()
            raise
        except (LockTimeout, LockQueueFull):
            raise  # already out of the queues
        except BaseException:
            if self.state == WAITING:
                self._finish_waiting("failed", lock_clock())
                lock._abandon(self)
            raise
        assert self.granted_token is not None
        self._token = self.granted_token
        self.state = HOLDING
        self.t_acquired = lock_clock()
        lock._local_leave(self, "acquired", self.t_acquired)
        if lock._observers:
            lock._emit([self._event("acquired", self.t_acquired, waited=self.t_acquired - self.t_request)])

    def _finish_waiting(self, outcome: str, now: float) -> None:
        lock = self.lock
        self.state = DONE
        self.cancel_watchdog()
        if lock._tickets.get(self.ticket) is self:
            del lock._tickets[self.ticket]
        lock._local_leave(self, outcome, now)
        if lock._observers and outcome in ("timed_out", "cancelled", "rejected"):
            waited = None if outcome == "rejected" else now - self.t_request
            lock._emit([self._event(outcome, now, waited=waited)])  # type: ignore[arg-type]

    async def _wait(self, pttl_ms: int, t_loop: float) -> None:
        """Wait until granted (woken by a message, or found by a re-check), timed out or failed."""
        lock = self.lock
        loop = lock._loop
        assert loop is not None
        deadline = math.inf if self.timeout is None else t_loop + self.timeout
        next_check = loop.time() + lock._recheck_delay(pttl_ms)
        while True:
            if self.error is not None:
                raise self.error
            if self.granted_token is not None:
                return
            now = loop.time()
            if now >= deadline:
                reply = await lock._call(scripts.WITHDRAW, [self.record], [lock._namespace, self.ticket], f"stop waiting for {describe(self.keys)}")
                if int(reply[0]) == 1:  # the handoff won the race: keep the keys
                    self.granted_token = int(reply[1])
                    return
                if int(reply[0]) == -2:
                    lock._lose(self, "gone", None)
                    continue
                end = lock._clock()
                self._finish_waiting("timed_out", end)
                waited = end - self.t_request
                raise LockTimeout(
                    f"gave up waiting for {describe(self.keys)} after {waited:.3g} s (timeout={self.timeout:g} s): "
                    "earlier requests held it the whole time",
                    keys=self.keys,
                    waited=waited,
                )
            if self.recheck_due or now >= next_check:
                self.recheck_due = False
                try:
                    reply = await lock._call(scripts.CHECK, [self.record], [lock._namespace, self.ticket], f"look at {describe(self.keys)}")
                except LockServerUnavailable:
                    next_check = loop.time() + lock._lease / 3  # its lease deadline decides if this lasts
                    continue
                status = int(reply[0])
                if status == 1:
                    self.granted_token = int(reply[1])
                    return
                if status == -2:
                    lock._lose(self, "gone", None)
                    continue
                next_check = loop.time() + lock._recheck_delay(int(reply[1]))
                continue
            poke = self.poke = loop.create_future()
            timer = loop.call_at(min(next_check, deadline), _set_result, poke)
            try:
                await poke
            finally:
                timer.cancel()
                self.poke = None

    async def _leave_cancelled(self) -> None:
        """The waiting task was cancelled: leave the queues, or pass on keys handed over meanwhile."""
        lock = self.lock
        now = lock._clock()
        if self.state != WAITING:
            return
        self._finish_waiting("cancelled", now)
        if not self.confirmed or lock._client is None:
            return

        async def leave() -> None:
            reply = await lock._call(scripts.WITHDRAW, [self.record], [lock._namespace, self.ticket], f"leave the queue of {describe(self.keys)}")
            if int(reply[0]) == 1:
                await lock._call(scripts.RELEASE, [self.record], [lock._namespace, self.ticket, reply[1]], f"pass on {describe(self.keys)}")

        task = asyncio.ensure_future(leave())
        await _finish_uncancellable(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("RedisKeyedLock: a cancelled request could not leave the queue at once (%s); its lease "
                           "runs out instead", task.exception())

    # ------------------------------------------------------------ releasing

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Awaitable[None]:
        return self._release(exc)

    async def _release(self, exc: BaseException | None) -> None:
        lock = self.lock
        if self.state != HOLDING:
            raise RuntimeError(f"released {describe(self.keys)} but this request does not hold it ({self.state})")
        self.state = RELEASING
        self.cancel_watchdog()
        if lock._tickets.get(self.ticket) is self:
            del lock._tickets[self.ticket]
        in_time = asyncio.get_running_loop().time() < self.deadline  # (the lock may be closed: no loop of its own)
        task = asyncio.ensure_future(
            lock._call(scripts.RELEASE, [self.record], [lock._namespace, self.ticket, str(self._token)], f"release {describe(self.keys)}")
        )
        cancelled = await _finish_uncancellable(task)
        now = lock._clock()
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            if self.lost is None and in_time:
                # The block ran under a valid lease; the keys pass on when it runs out.
                logger.warning(
                    "RedisKeyedLock: could not release %s (%s); it passes on when its lease runs out", describe(self.keys), failure
                )
            elif self.lost is None:
                self.lost = LockLost(
                    f"{self.label_text!r} cannot tell whether it still held {describe(self.keys)} (token {self._token}) "
                    f"at the end of its block: its lease of {lock._lease:g} s was not renewed in time and Redis at "
                    f"{lock.url} is unreachable",
                    keys=self.keys,
                    url=lock.url,
                )
                self.lost.__cause__ = failure
                lock._losses += 1
        elif not task.cancelled() and int(task.result()) != 1 and self.lost is None:
            self.lost = LockLost(
                f"{self.label_text!r} lost the lock on {describe(self.keys)} (token {self._token}) before its block "
                f"ended: its lease of {lock._lease:g} s ran out (the process was paused or cut off), or Redis at "
                f"{lock.url} restarted or lost its data; another caller may have held it meanwhile",
                keys=self.keys,
                url=lock.url,
            )
            lock._losses += 1
        self.state = DONE
        held = lock._local_release(self, now)
        if lock._observers:
            lock._emit([self._event("released", now, held=held)])
        owner = self.owner
        if self.lost is not None:
            if self.cancelled_by_lock and owner is not None:
                owner.uncancel()
            if owner is not None and owner.cancelling():
                raise asyncio.CancelledError  # cancelled by someone else too: that wins
            raise self.lost from (exc if exc is not None else self.lost.__cause__)
        if cancelled:
            raise asyncio.CancelledError


async def _finish_uncancellable(task: asyncio.Future[Any]) -> bool:
    """Await ``task`` to its end even if the caller is cancelled meanwhile; return whether it was."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                break
            cancelled = True
        except BaseException:
            break
    return cancelled


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
