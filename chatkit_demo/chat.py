"""The Chat tab's handlers: :class:`DemoHandlers` (chat, double texting, the session API)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import gradio as gr

import chatkit

from .config import POLICIES, POLICY_HELP
from .inputs import validate_message
from .services import _BURST, DemoServices, _Burst


# ------------------------------------------------------------------------------------------ handlers
def _ui_error(exc: BaseException) -> gr.Error:
    """A Gradio error whose text is the exception's own message (shown in the UI and to API clients)."""
    return gr.Error(str(exc) or type(exc).__name__, print_exception=False)


def _chat_messages(history: Sequence[Any]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in history]


def _sources_of(result: Any) -> list[str]:
    """The knowledge-base sources a chat result drew on, de-duplicated, in order."""
    found: list[str] = []
    for item in getattr(result, "sources", None) or ():
        source = item if isinstance(item, str) else getattr(item, "metadata", {}).get("source")
        if source and source not in found:
            found.append(str(source))
    return found


class DemoHandlers:
    """The demo's event handlers: plain async methods, callable directly in tests.

    Every method that touches a chat session takes the ``gr.Request`` and resolves the session through
    the :class:`SessionBinder`; none accepts a session id without the binding check.

    Example:
        >>> import asyncio
        >>> from chatkit_demo.config import DemoConfig
        >>> handlers = DemoHandlers(DemoServices(DemoConfig(embeddings="hash", data_dir=None)))
        >>> asyncio.run(handlers.chat("   ", gr.Request(session_hash="doc")))
        Traceback (most recent call last):
        ...
        gradio.exceptions.Error: 'The message is empty: type something first.'

    Raises:
        gr.Error: for every user-facing problem (bad input, a foreign session id, a busy session); its
            message is shown in the UI and returned to API clients.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<DemoHandlers {self.services!r}>"

    # -- chat ------------------------------------------------------------------------------------
    def _message(self, message: object) -> str:
        try:
            return validate_message(message, max_chars=self.services.config.max_message_chars)
        except ValueError as exc:
            raise _ui_error(exc) from None

    async def _session(self, request: gr.Request | None, session_id: object = None) -> str:
        await self.services.ready()
        try:
            if session_id is None:
                return await self.services.binder.session_for(request)
            return self.services.binder.check(session_id, request)
        except PermissionError as exc:
            raise _ui_error(exc) from None

    async def _turn(
        self, session_id: str, text: str, request: gr.Request | None, policy: str | None = None
    ) -> Any:
        try:
            return await self.services.manager.chat(session_id, text, policy=policy)
        except chatkit.SessionNotFound:
            self.services.binder.release(request)  # expired: the next message starts a new session
            raise gr.Error(
                "Your chat session expired after a long idle time; a new one starts with your next message."
            ) from None
        except (ValueError, chatkit.ChatkitError) as exc:
            raise _ui_error(exc) from None

    async def _history(self, session_id: str, request: gr.Request | None) -> list[dict[str, str]]:
        try:
            return _chat_messages(await self.services.manager.get_history(session_id))
        except chatkit.SessionNotFound:  # expired while idle: forget it; the next message starts anew
            self.services.binder.release(request)
            return []

    async def chat(self, message: str, request: gr.Request) -> tuple[list[dict[str, str]], str, str]:
        """Send ``message`` in the caller's own session.

        Returns:
            (the session's whole history for the Chatbot, the sources of the answer as Markdown,
            ``""`` to clear the textbox).
        """
        text = self._message(message)
        sid = await self._session(request)
        result = await self._turn(sid, text, request)
        sources = _sources_of(result)
        note = (
            "**Retrieved from** (best match first): " + ", ".join(f"`{s}`" for s in sources)
            if sources
            else "_No knowledge-base document was used._"
        )
        return await self._history(sid, request), note, ""

    async def restore(self, request: gr.Request) -> tuple[list[dict[str, str]], str]:
        """The caller's history and a short description of its session (on page load)."""
        sid = await self._session(request)
        short = sid[:8]
        return await self._history(sid, request), f"Your private chat session: `{short}…` (bound to this browser tab)"

    async def double_text(
        self, message: str, count: float, policy: str, request: gr.Request
    ) -> tuple[list[dict[str, str]], list[list[str]], str]:
        """Send ``count`` copies of ``message`` (numbered) at once under ``policy``; show what happened.

        The model is made slow (``burst_latency``) for these turns only, so the messages overlap.

        Returns:
            (the history, one table row per message: [message, outcome, reply], the policy's explanation).
        """
        text = self._message(message)
        if policy not in POLICIES:
            raise gr.Error(f"Unknown policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        n = int(count)
        if not 1 <= n <= self.services.config.max_burst:
            raise gr.Error(f"Send between 1 and {self.services.config.max_burst} messages at once, not {n}.")
        sid = await self._session(request)
        texts = [f"{text} (#{i + 1} of {n})" for i in range(n)]
        manager = self.services.manager
        burst = _Burst(self.services.config.burst_latency)
        token = _BURST.set(burst)  # inherited by the tasks created below, and only by them
        tasks: list[asyncio.Task[Any]] = []
        started = asyncio.create_task(burst.started(texts[0]).wait())
        try:
            # message 1 first; the others the moment its model call has started (or it has finished),
            # each created in order so that each joins the session's queue before the next
            tasks.append(asyncio.create_task(manager.chat(sid, texts[0], policy=policy)))
            await asyncio.wait([tasks[0], started], return_when=asyncio.FIRST_COMPLETED)
            for t in texts[1:]:
                tasks.append(asyncio.create_task(manager.chat(sid, t, policy=policy)))
                await asyncio.sleep(0)
            burst.all_sent.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:  # the visitor went away: cancel the burst's turns (chatkit rolls them back)
            for task in tasks:
                task.cancel()
            raise
        finally:
            started.cancel()
            burst.all_sent.set()  # never leave a turn held, whatever happened above
            _BURST.reset(token)
        history = await self.services.manager.get_history(sid)
        rows = [[t, *_describe_outcome(out)] for t, out in zip(texts, outcomes, strict=True)]
        return _chat_messages(history), rows, POLICY_HELP[policy]

    async def api_session(self, request: gr.Request) -> str:
        """API: the caller's own session id (created on first use)."""
        return await self._session(request)

    async def api_history(self, session_id: str, request: gr.Request) -> list[dict[str, str]]:
        """API: the history of ``session_id``, only if it belongs to the caller."""
        sid = await self._session(request, session_id)
        return await self._history(sid, request)

    async def api_send(self, session_id: str, message: str, request: gr.Request) -> str:
        """API: send ``message`` into ``session_id``, only if it belongs to the caller; returns the reply."""
        text = self._message(message)
        sid = await self._session(request, session_id)
        result = await self._turn(sid, text, request)
        return str(result.reply)

    async def unload(self, request: gr.Request) -> None:
        """The browser tab closed: unbind its session and delete it."""
        sid = self.services.binder.release(request)
        if sid is not None and self.services.manager is not None:
            try:
                await self.services.manager.delete_session(sid)
            except chatkit.ChatkitError:  # already expired
                pass


def _describe_outcome(outcome: object) -> tuple[str, str]:
    """(what happened, reply) for one double-texted message, from what its ``chat()`` call returned."""
    if isinstance(outcome, chatkit.SessionBusy):
        return "rejected at once (session busy); nothing stored", ""
    kept = getattr(outcome, "kept_message", None)  # chatkit's TurnInterrupted
    if kept is not None:
        if kept:
            return "interrupted: its message stays in the history, without a reply", ""
        return "superseded: discarded, nothing of it kept", ""
    if isinstance(outcome, BaseException):
        return f"failed: {outcome or type(outcome).__name__}", ""
    return "answered", str(getattr(outcome, "reply", ""))
