"""Binding chatkit sessions to browsers: :class:`SessionBinder`.

A *page* is one browser tab's connection: Gradio's ``session_hash`` (plus the login name under ``--auth``).
Each page has a *visitor* id (who added what to the shared knowledge base) and at most one chatkit
session. The browser keeps both as signed tokens (:class:`~chatkit_demo.tokens.TokenSigner`) in its
``localStorage``, so a reload restores them; the server keeps only a bounded cache of pages (the least
recently seen are forgotten first, idle ones after ``ttl``), which the tokens refill.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gradio as gr

import chatkit

from .tokens import TokenSigner

Owner = tuple[str | None, str]  # (login name under --auth, Gradio session hash)
SESSION, VISITOR = "session", "visitor"  # the kinds of token the browser keeps


OUTBOX_STALE = 60.0  # seconds after which a posted message that no reply took is dropped


@dataclasses.dataclass(slots=True)
class _Page:
    visitor: str
    session: str | None
    seen: float
    outbox: tuple[str, float] | None = None  # a message posted by the page, waiting for its reply event


@dataclasses.dataclass(frozen=True, slots=True)
class Restored:
    """What :meth:`SessionBinder.restore` found in the browser's saved tokens.

    Attributes:
        session: the chatkit session id now bound to the page (``None``: none yet).
        visitor: the page's visitor id.
        refused: a session token was presented and refused (forged, altered, another login's, or from an
            earlier start of the server).
    """

    session: str | None
    visitor: str
    refused: bool


class SessionBinder:
    """Binds each browser page to a visitor id and at most one chatkit session; checks the tokens it signs.

    ``await session_for(request)`` returns the page's session, creating it on first use with ``create`` (a
    function returning the new id, or an awaitable of it) under a per-page lock, so two first messages
    can't create two sessions. ``check`` accepts a session id only when it is the caller's. ``saved`` gives
    the tokens the browser should keep; ``restore`` (on page load) and ``resolve`` (on any event) bind what
    they prove. At most ``max_pages`` pages are kept (least recently seen dropped first), none idle longer
    than ``ttl`` seconds once :meth:`sweep` runs; a dropped page is rebuilt from its browser's tokens.

    Example:
        >>> import asyncio
        >>> ids = iter(["s1" * 8, "s2" * 8])
        >>> binder = SessionBinder(create=lambda: next(ids))
        >>> alice, bob = gr.Request(session_hash="a"), gr.Request(session_hash="b")
        >>> async def visits():
        ...     return [await binder.session_for(r) for r in (alice, alice, bob)]
        >>> asyncio.run(visits())
        ['s1s1s1s1s1s1s1s1', 's1s1s1s1s1s1s1s1', 's2s2s2s2s2s2s2s2']
        >>> binder.check("s1" * 8, bob)
        Traceback (most recent call last):
        ...
        PermissionError: session 's1s1s1s1s1s1s1s1' does not belong to this browser session
        >>> reloaded = gr.Request(session_hash="a-after-reload")
        >>> binder.restore(binder.saved(alice), reloaded).session
        's1s1s1s1s1s1s1s1'

    Raises:
        ValueError: ``max_pages`` < 1 or a negative ``ttl``.
    """

    def __init__(
        self,
        *,
        create: Callable[[], Any],
        signer: TokenSigner | None = None,
        ttl: float | None = None,
        max_pages: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages!r}")
        if ttl is not None and not ttl >= 0:
            raise ValueError(f"ttl must be >= 0 seconds or None, got {ttl!r}")
        self._create = create
        self.signer = signer if signer is not None else TokenSigner()
        self._ttl = ttl
        self._max_pages = max_pages
        self._clock = clock
        self._guard = threading.Lock()
        self._creating = chatkit.KeyedLock()  # per page: one creation at a time, across loops and threads
        self._pages: collections.OrderedDict[Owner, _Page] = collections.OrderedDict()  # least recently seen first

    def __repr__(self) -> str:
        with self._guard:
            bound = sum(1 for p in self._pages.values() if p.session is not None)
            return f"<SessionBinder pages={len(self._pages)} with_session={bound} max_pages={self._max_pages}>"

    def __len__(self) -> int:
        """Pages known now (bounded by ``max_pages``)."""
        return len(self._pages)

    # ------------------------------------------------------------------ pages

    @staticmethod
    def owner(request: gr.Request | None) -> Owner:
        """The page a request comes from.

        Raises:
            PermissionError: the request carries no browser session (``session_hash``).
        """
        session_hash = getattr(request, "session_hash", None) if request is not None else None
        if not session_hash or not isinstance(session_hash, str):
            raise PermissionError("this request has no browser session; open the demo in a browser")
        username = getattr(request, "username", None)
        return (username if isinstance(username, str) else None, session_hash)

    def _page(self, owner: Owner) -> _Page:
        """Guard held: the page of ``owner`` (created with a new visitor id), marked as seen now."""
        page = self._pages.get(owner)
        if page is None:
            page = self._pages[owner] = _Page(visitor=secrets.token_urlsafe(16), session=None, seen=self._clock())
            while len(self._pages) > self._max_pages:
                self._pages.popitem(last=False)
        else:
            page.seen = self._clock()
            self._pages.move_to_end(owner)
        return page

    def visitor(self, request: gr.Request | None) -> str:
        """The visitor id of the caller's page (a new one for a page never seen)."""
        owner = self.owner(request)
        with self._guard:
            return self._page(owner).visitor

    def saved(self, request: gr.Request | None) -> dict[str, str | None]:
        """The tokens the caller's browser should keep: ``{"visitor": ..., "session": ... or None}``."""
        owner = self.owner(request)
        with self._guard:
            page = self._page(owner)
            visitor, session = page.visitor, page.session
        sign = self.signer.sign
        return {
            VISITOR: sign(VISITOR, visitor, user=owner[0]),
            SESSION: None if session is None else sign(SESSION, session, user=owner[0]),
        }

    def restore(self, saved: object, request: gr.Request | None) -> Restored:
        """Bind the caller's page to what the browser's saved tokens prove (on page load).

        A valid visitor token gives the page its visitor id back; a valid session token binds the page to
        that session (whether it still exists is the session manager's to say). Anything else is ignored,
        and a refused session token is reported (``refused``), never bound.
        """
        owner = self.owner(request)
        user = owner[0]
        tokens: Mapping[str, object] = saved if isinstance(saved, Mapping) else {}
        visitor = session = None
        refused = False
        try:
            visitor = self.signer.verify(VISITOR, tokens.get(VISITOR), user=user)
        except PermissionError:
            pass
        if tokens.get(SESSION) is not None:
            try:
                session = self.signer.verify(SESSION, tokens.get(SESSION), user=user)
            except PermissionError:
                refused = True
        with self._guard:
            page = self._page(owner)
            if visitor is not None:
                page.visitor = visitor
            if session is not None:
                page.session = session
            return Restored(session=page.session, visitor=page.visitor, refused=refused)

    def resolve(self, saved: object, request: gr.Request | None) -> Owner:
        """Make sure the caller's page is known (rebuilt from the browser's tokens if it was dropped)."""
        owner = self.owner(request)
        with self._guard:
            known = owner in self._pages
        if not known:
            self.restore(saved, request)
        return owner

    # ------------------------------------------------------------------ sessions

    async def session_for(self, request: gr.Request | None) -> str:
        """The caller's chatkit session id, created and bound on first use."""
        owner = self.owner(request)
        with self._guard:
            sid = self._page(owner).session
        if sid is not None:
            return sid
        async with self._creating(owner):
            with self._guard:
                sid = self._page(owner).session
            if sid is not None:
                return sid
            created = self._create()
            if inspect.isawaitable(created):
                created = await created
            with self._guard:
                self._page(owner).session = str(created)
            return str(created)

    def peek(self, request: gr.Request | None) -> str | None:
        """The caller's session id if it has one, without creating it."""
        owner = self.owner(request)
        with self._guard:
            page = self._pages.get(owner)
            return None if page is None else page.session

    def check(self, session_id: object, request: gr.Request | None) -> str:
        """Return ``session_id`` if it is bound to the caller's page.

        Raises:
            PermissionError: unknown, malformed or foreign id (the same message for all three, so a
                caller learns nothing about other visitors' sessions).
        """
        owner = self.owner(request)
        with self._guard:
            page = self._pages.get(owner)
            if isinstance(session_id, str) and page is not None and page.session == session_id:
                self._page(owner)  # seen now
                return session_id
        raise PermissionError(f"session {str(session_id)[:80]!r} does not belong to this browser session")

    def rebind(self, request: gr.Request | None, session_id: str | None) -> str | None:
        """Bind the caller's page to ``session_id`` (``None``: no session); returns the one it had."""
        owner = self.owner(request)
        with self._guard:
            page = self._page(owner)
            previous, page.session = page.session, session_id
            return previous

    def post(self, request: gr.Request | None, text: str, *, busy: Callable[[], bool]) -> bool:
        """Put ``text`` in the caller's outbox for the event that answers it; ``False`` (nothing posted) if
        the outbox holds a message already or ``busy()`` says a reply is being written."""
        owner = self.owner(request)
        with self._guard:
            page = self._page(owner)
            if page.outbox is not None and page.outbox[1] > self._clock() - OUTBOX_STALE:
                return False
            if busy():
                return False
            page.outbox = (text, self._clock())
            return True

    def take(self, request: gr.Request | None) -> str | None:
        """Take the message waiting in the caller's outbox, if any."""
        owner = self.owner(request)
        with self._guard:
            page = self._pages.get(owner)
            if page is None or page.outbox is None:
                return None
            text, page.outbox = page.outbox[0], None
            return text

    def release(self, request: gr.Request | None) -> str | None:
        """Forget the caller's page (its tab closed or reloaded); returns its session id, if any.

        The session itself lives on (a reload claims it back with its token) until it expires.
        """
        try:
            owner = self.owner(request)
        except PermissionError:
            return None
        with self._guard:
            page = self._pages.pop(owner, None)
            return None if page is None else page.session

    def forget(self, session_ids: Iterable[str]) -> int:
        """Unbind every page from these (expired or deleted) sessions; returns how many pages it changed."""
        gone = set(session_ids)
        changed = 0
        with self._guard:
            for page in self._pages.values():
                if page.session in gone:
                    page.session = None
                    changed += 1
        return changed

    def retain(self, alive: Iterable[str]) -> int:
        """Unbind every page whose session is not in ``alive``; returns how many pages it changed."""
        keep = set(alive)
        with self._guard:
            gone = {p.session for p in self._pages.values() if p.session is not None and p.session not in keep}
        return self.forget(gone)

    def sweep(self) -> int:
        """Forget pages not seen for ``ttl`` seconds; returns how many."""
        if self._ttl is None:
            return 0
        cutoff = self._clock() - self._ttl
        dropped = 0
        with self._guard:
            while self._pages:
                owner, page = next(iter(self._pages.items()))
                if page.seen > cutoff:
                    break
                del self._pages[owner]
                dropped += 1
        return dropped
