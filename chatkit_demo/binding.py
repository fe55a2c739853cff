"""Binding chatkit sessions to browser sessions: :class:`SessionBinder`."""

from __future__ import annotations

import inspect
import threading
from typing import Any

import gradio as gr

import chatkit


# ---------------------------------------------------------------------------------- session binding
Owner = tuple[str | None, str]  # (login name under --auth, Gradio session hash)


class SessionBinder:
    """Binds each chatkit session to the browser session that created it.

    The owner of a request is Gradio's ``session_hash`` (one per page load / per ``gradio_client``),
    plus the login name when ``--auth`` is on. ``await session_for(request)`` returns the caller's own
    session, creating it on first use with ``create`` (a function returning the new id, or an awaitable of
    it), under a per-owner lock, so two first messages can't create two sessions. ``check`` accepts a
    session id only when it belongs to the caller.

    Example:
        >>> import asyncio
        >>> ids = iter(["s1", "s2"])
        >>> binder = SessionBinder(create=lambda: next(ids))
        >>> alice, bob = gr.Request(session_hash="a"), gr.Request(session_hash="b")
        >>> async def visits():
        ...     return [await binder.session_for(r) for r in (alice, alice, bob)]
        >>> asyncio.run(visits())
        ['s1', 's1', 's2']
        >>> binder.check("s1", bob)
        Traceback (most recent call last):
        ...
        PermissionError: session 's1' does not belong to this browser session
    """

    def __init__(self, *, create: Any) -> None:
        self._create = create
        self._guard = threading.Lock()
        self._creating = chatkit.KeyedLock()  # per owner: one creation at a time, across loops and threads
        self._by_owner: dict[Owner, str] = {}
        self._owner_of: dict[str, Owner] = {}

    def __repr__(self) -> str:
        return f"<SessionBinder bound={len(self._by_owner)}>"

    def __len__(self) -> int:
        return len(self._by_owner)

    @staticmethod
    def owner(request: gr.Request | None) -> Owner:
        """The binding key of a request.

        Raises:
            PermissionError: the request carries no browser session (``session_hash``).
        """
        session_hash = getattr(request, "session_hash", None) if request is not None else None
        if not session_hash or not isinstance(session_hash, str):
            raise PermissionError("this request has no browser session; open the demo in a browser")
        username = getattr(request, "username", None)
        return (username if isinstance(username, str) else None, session_hash)

    async def session_for(self, request: gr.Request | None) -> str:
        """The caller's chatkit session id, created and bound on first use."""
        owner = self.owner(request)
        with self._guard:
            sid = self._by_owner.get(owner)
        if sid is not None:
            return sid
        async with self._creating(owner):
            with self._guard:
                sid = self._by_owner.get(owner)
            if sid is not None:
                return sid
            created = self._create()
            if inspect.isawaitable(created):
                created = await created
            with self._guard:
                self._by_owner[owner] = created
                self._owner_of[created] = owner
            return str(created)

    def peek(self, request: gr.Request | None) -> str | None:
        """The caller's session id if it has one, without creating it."""
        owner = self.owner(request)
        with self._guard:
            return self._by_owner.get(owner)

    def check(self, session_id: object, request: gr.Request | None) -> str:
        """Return ``session_id`` if it is bound to the caller.

        Raises:
            PermissionError: unknown, malformed or foreign id (the same message for all three, so a
                caller learns nothing about other visitors' sessions).
        """
        owner = self.owner(request)
        with self._guard:
            if isinstance(session_id, str) and self._owner_of.get(session_id) == owner:
                return session_id
        raise PermissionError(f"session {str(session_id)[:80]!r} does not belong to this browser session")

    def release(self, request: gr.Request | None) -> str | None:
        """Unbind the caller's session (browser tab closed); returns the id it had, if any."""
        try:
            owner = self.owner(request)
        except PermissionError:
            return None
        with self._guard:
            sid = self._by_owner.pop(owner, None)
            if sid is not None:
                self._owner_of.pop(sid, None)
            return sid
