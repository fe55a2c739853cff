"""The Chat tab's handlers: :class:`DemoHandlers` (streamed chat, stop, reload restore, double texting, API).

The page's events never raise for what a visitor can do wrong (an empty message, a busy or expired
conversation): they answer with a notice in plain words, and leave the message box as it was, so nothing
typed is lost and Gradio never covers the page with "Error" badges. The API endpoints (``api_*``, for
``gradio_client``) raise ``gr.Error`` instead, which API clients receive as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import gradio as gr

import chatkit

from .config import POLICIES, POLICY_HELP
from .inputs import validate_message
from .services import _BURST, DemoServices, _Burst
from .tables import html_table

logger = logging.getLogger("chatkit.demo")

Message = dict[str, Any]
OUTCOME_HEADERS = ["message", "what happened", "reply"]
WRITING = "_writing the reply…_"
LOADING = "_waiting for the knowledge base to finish loading…_"
CURSOR = " ▍"


class UserError(Exception):
    """Something to tell the visitor in plain words (bad input, a busy or expired conversation); not a bug."""


def _ui_error(exc: BaseException) -> gr.Error:
    """A Gradio error whose text is the exception's own message (for API clients; no traceback logged)."""
    return gr.Error(str(exc) or type(exc).__name__, print_exception=False)


def _chat_messages(history: Sequence[Any]) -> list[Message]:
    return [{"role": m.role, "content": m.content} for m in history]


def _view(history: Sequence[Any], pending: str | None = None, partial: str = "", *, waiting: str = WRITING) -> list[Message]:
    """The conversation as the Chatbot shows it: the stored history, then the turn being written (if any)."""
    messages = _chat_messages(history)
    if pending is not None:
        messages.append({"role": "user", "content": pending})
        messages.append({"role": "assistant", "content": partial.rstrip() + CURSOR if partial else waiting})
    return messages


def _discarded(text: str) -> Message:
    """The note that replaces a stopped turn in the conversation (shown, never stored)."""
    quoted = text if len(text) <= 120 else text[:119] + "…"
    return {
        "role": "assistant",
        "content": f"⏹ **Stopped.** Your message “{quoted}” and its partial reply were discarded: "
        "nothing of this turn was saved.",
    }


def _sources_note(sources: Sequence[str]) -> str:
    if not sources:
        return "_No knowledge-base document was used._"
    return "**Retrieved from** (best match first): " + ", ".join(f"`{s}`" for s in sources)


def _sources_of(result: Any) -> list[str]:
    """The knowledge-base sources a chat result (or a list of Documents) drew on, de-duplicated, in order."""
    items = result if isinstance(result, list) else getattr(result, "sources", None) or ()
    found: list[str] = []
    for item in items:
        source = item if isinstance(item, str) else getattr(item, "metadata", {}).get("source")
        if source and source not in found:
            found.append(str(source))
    return found


class _UiTurn:
    """A reply being streamed to a page, which the page's Stop button may stop."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.done = asyncio.Event()

    def request_stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)


class _Running:
    """The replies being streamed now, per session (for Stop and for "wait for the reply" notices).
    Entries exist only while a reply streams, so this never grows beyond the replies in flight."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._turns: dict[str, set[_UiTurn]] = {}

    def __len__(self) -> int:
        with self._guard:
            return sum(len(t) for t in self._turns.values())

    def begin(self, session_id: str) -> _UiTurn:
        turn = _UiTurn(session_id)
        with self._guard:
            self._turns.setdefault(session_id, set()).add(turn)
        return turn

    def end(self, turn: _UiTurn) -> None:
        with self._guard:
            turns = self._turns.get(turn.session_id)
            if turns is not None:
                turns.discard(turn)
                if not turns:
                    del self._turns[turn.session_id]
        turn.done.set()

    def of(self, session_id: str) -> list[_UiTurn]:
        with self._guard:
            return list(self._turns.get(session_id, ()))


class _Budget:
    """Messages in flight per session, for the per-conversation message limit (entries only while in flight)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._inflight: dict[str, int] = {}

    def reserve(self, session_id: str, n: int, *, stored: int, limit: int) -> None:
        """Reserve ``n`` messages of ``session_id``, which holds ``stored`` already.

        Raises:
            UserError: the conversation would exceed ``limit`` messages.
        """
        with self._guard:
            used = stored + self._inflight.get(session_id, 0)
            if used + n > limit:
                raise _full(limit)
            self._inflight[session_id] = self._inflight.get(session_id, 0) + n

    def release(self, session_id: str, n: int) -> None:
        with self._guard:
            left = self._inflight.get(session_id, 0) - n
            if left > 0:
                self._inflight[session_id] = left
            else:
                self._inflight.pop(session_id, None)

    def __len__(self) -> int:
        with self._guard:
            return len(self._inflight)


class DemoHandlers:
    """The Chat tab's event handlers: plain async methods (and one async generator), callable in tests.

    Every method that touches a conversation takes the ``gr.Request`` and resolves the session through the
    :class:`~chatkit_demo.binding.SessionBinder`; none accepts a session id without the binding check.

    Example:
        >>> import asyncio
        >>> from chatkit_demo.config import DemoConfig
        >>> handlers = DemoHandlers(DemoServices(DemoConfig(embeddings="hash", data_dir=None)))
        >>> box, chatbot, notice, saved, stop = asyncio.run(handlers.prepare("   ", None, gr.Request(session_hash="doc")))
        >>> notice
        'The message is empty: type something first.'
        >>> asyncio.run(handlers.api_chat("   ", gr.Request(session_hash="doc")))
        Traceback (most recent call last):
        ...
        gradio.exceptions.Error: 'The message is empty: type something first.'

    Raises:
        gr.Error: from the ``api_*`` methods, for every problem an API client caused (bad input, a foreign
            session id, a busy or full conversation).
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services
        self.running = _Running()
        self.budget = _Budget()

    def __repr__(self) -> str:
        return f"<DemoHandlers {self.services!r} streaming={len(self.running)}>"

    # -- helpers -----------------------------------------------------------------------------------
    def _message(self, message: object) -> str:
        try:
            return validate_message(message, max_chars=self.services.config.max_message_chars)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    async def _session(self, request: gr.Request | None, session_id: object = None) -> str:
        self.services.note_ui_loop()
        await self.services.core()
        try:
            if session_id is None:
                return await self.services.binder.session_for(request)
            return self.services.binder.check(session_id, request)
        except PermissionError as exc:
            raise UserError(str(exc)) from None

    def _expired(self, request: gr.Request | None) -> UserError:
        self.services.binder.rebind(request, None)  # the next message starts a new conversation
        return UserError(
            f"Your conversation expired after {duration(self.services.config.session_ttl)} without messages; "
            "a new one starts with your next message."
        )

    async def _history(self, session_id: str, request: gr.Request | None) -> list[Any]:
        try:
            return list(await self.services.manager.get_history(session_id))
        except chatkit.SessionNotFound:
            raise self._expired(request) from None

    async def _stored(self, session_id: str, request: gr.Request | None) -> int:
        return sum(1 for m in await self._history(session_id, request) if m.role == "user")

    async def _sources_after(self, session_id: str) -> list[str]:
        """The sources retrieved for the session's latest committed turn (the state's ``context``)."""
        state = await self.services.manager.graph.aget_state({"configurable": {"thread_id": session_id}})
        return _sources_of(list((state.values or {}).get("context") or ()))

    def _session_note(self, stored: int | None) -> str:
        cfg = self.services.config
        used = "" if stored is None else f" {stored} of {cfg.max_turns} messages used."
        return (
            f"**Your conversation** is private to this browser: a reload keeps it; it expires after "
            f"{duration(cfg.session_ttl)} without messages.{used}"
        )

    # -- page load ---------------------------------------------------------------------------------
    async def restore(
        self, saved: object, request: gr.Request
    ) -> tuple[list[Message], str, dict[str, str | None], str]:
        """On page load: restore the conversation the browser's saved token proves (a reload keeps it).

        Returns:
            (the conversation, the session note, the tokens for the browser to keep, a notice).
        """
        self.services.note_ui_loop()
        await self.services.core()
        binder = self.services.binder
        restored = binder.restore(saved, request)
        notice = ""
        history: list[Any] = []
        if restored.refused:
            notice = (
                "The conversation saved in this browser could not be restored (the server restarted, or the "
                "token was not issued to you); a new one starts with your next message."
            )
        if restored.session is not None:
            try:
                history = await self._history(restored.session, request)
            except UserError as exc:
                notice = str(exc)
        stored = sum(1 for m in history if m.role == "user") if restored.session else None
        return _chat_messages(history), self._session_note(stored), binder.saved(request), notice

    async def unload(self, request: gr.Request) -> None:
        """The tab closed or reloads: forget the page. The conversation stays until it expires, so a
        reload (or another tab of the same browser) claims it back with the saved token."""
        self.services.binder.release(request)

    # -- sending from the message box ----------------------------------------------------------------
    async def prepare(
        self, message: str, saved: object, request: gr.Request
    ) -> tuple[Any, Any, str, Any, Any]:
        """First step of a send: check the message, then move it from the box into the conversation.

        On a problem the box keeps its text and a notice says why. Otherwise the message waits in the
        page's outbox for :meth:`reply` (the event that follows), which streams the answer.

        Returns:
            (the box, the conversation, a notice, the browser's tokens, the Stop button).
        """
        skip = gr.skip()
        binder = self.services.binder
        try:
            binder.resolve(saved, request)
            text = self._message(message)
            sid = await self._session(request)
            history = await self._history(sid, request)
            if sum(1 for m in history if m.role == "user") >= self.services.config.max_turns:
                raise _full(self.services.config.max_turns)
            posted = binder.post(request, text, busy=lambda: bool(self.running.of(sid)) or self.services.manager.is_busy(sid))
            if not posted:
                raise UserError(
                    "A reply is still being written: wait for it (or press Stop); your message stays in the box."
                )
        except (UserError, PermissionError) as exc:
            return skip, skip, str(exc), binder.saved(request) if _has_page(request) else skip, skip
        waiting = WRITING if self.services.is_ready else LOADING
        view = _view(history, text, waiting=waiting)
        return "", view, "", binder.saved(request), gr.update(interactive=True)

    async def reply(self, saved: object, request: gr.Request) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
        """Second step of a send: stream the answer to the message :meth:`prepare` put in the outbox.

        Yields (the conversation, the sources note, a notice, the Stop button) as the words arrive. Stop
        (:meth:`stop`) cancels the turn: chatkit rolls it back atomically, and the conversation shows it was
        discarded. Never raises for expected problems: they become the notice.
        """
        skip = gr.skip()
        binder = self.services.binder
        try:
            binder.resolve(saved, request)
            sid = binder.peek(request)
        except PermissionError:
            sid = None
        if sid is None:  # prepare refused the message: nothing to answer
            yield skip, skip, skip, skip
            return
        turn = self.running.begin(sid)
        text = binder.take(request)
        reserved = 0
        try:
            if text is None:  # nothing posted (prepare refused it, or another reply event took it)
                yield skip, skip, skip, skip
                return
            async for update in self._stream(sid, text, turn, request):
                if isinstance(update, int):
                    reserved = update
                    continue
                yield update
        except UserError as exc:
            yield skip, skip, str(exc), gr.update(interactive=False)
        except Exception as exc:  # a bug: logged with its traceback, the page gets one plain line
            logger.exception("streaming a reply failed")
            yield skip, skip, f"Something went wrong on the server ({type(exc).__name__}); please try again.", gr.update(interactive=False)
        finally:
            if reserved:
                self.budget.release(sid, reserved)
            self.running.end(turn)

    async def _stream(self, sid: str, text: str, turn: _UiTurn, request: gr.Request) -> AsyncIterator[Any]:
        """The body of :meth:`reply` (yields the budget reserved, then the UI updates)."""
        services = self.services
        stop_on = gr.update(interactive=True)
        stop_off = gr.update(interactive=False)
        skip = gr.skip()
        history = await self._history(sid, request)
        stored = sum(1 for m in history if m.role == "user")
        self.budget.reserve(sid, 1, stored=stored, limit=services.config.max_turns)
        yield 1
        if not services.is_ready:
            yield _view(history, text, waiting=LOADING), skip, "Loading the knowledge base…", stop_on
            await _until(asyncio.shield(services.ready()), turn.stop)  # the loading itself is never cancelled
            if turn.stop.is_set():
                yield [*_chat_messages(history), _discarded(text)], skip, "Stopped: your message was discarded.", stop_off
                return
        yield _view(history, text), skip, "", stop_on
        partial = ""
        stopped = False
        stream = services.manager.stream(sid, text)
        try:
            async with contextlib.aclosing(stream):
                iterator = stream.__aiter__()
                while True:
                    nxt = asyncio.ensure_future(iterator.__anext__())
                    chunk = await _until(nxt, turn.stop)
                    if chunk is _STOPPED:
                        stopped = True
                        nxt.cancel()  # the stream's consumer goes away: chatkit cancels the turn, rolls it back
                        await asyncio.wait([nxt])
                        break
                    if chunk is _END:
                        break
                    partial += chunk
                    yield _view(history, text, partial), skip, "", stop_on
        except chatkit.SessionNotFound:
            raise self._expired(request) from None
        except chatkit.TurnInterrupted as exc:
            after = await self._history(sid, request)
            yield _chat_messages(after), skip, f"Your message was superseded by a newer one ({exc}).", stop_off
            return
        except (ValueError, chatkit.ChatkitError) as exc:
            raise UserError(str(exc)) from None
        after = await self._history(sid, request)
        committed = len(after) > len(history) and any(
            m.role == "user" and m.content == text for m in after[len(history):]
        )
        if stopped and not committed:
            view = [*_chat_messages(after), _discarded(text)]
            yield view, skip, "Stopped: your message and the partial reply were discarded (nothing was saved).", stop_off
            return
        sources = await self._sources_after(sid)
        note = "" if not stopped else "Stop came too late: the reply had already been saved."
        yield _chat_messages(after), _sources_note(sources), note, stop_off

    async def stop(self, request: gr.Request) -> str | Any:
        """Stop the reply being streamed to the caller's conversation; the streaming event shows the result.

        Returns:
            ``gr.skip()`` once the turn was rolled back, or a notice when nothing was being written.
        """
        sid = self.services.binder.peek(request) if _has_page(request) else None
        turns = self.running.of(sid) if sid is not None else []
        if not turns:
            return "Nothing to stop: no reply is being written."
        for turn in turns:
            turn.request_stop()
        for turn in turns:
            if turn.loop is asyncio.get_running_loop():
                await turn.done.wait()
        return gr.skip()

    async def new_conversation(
        self, saved: object, request: gr.Request
    ) -> tuple[list[Message], str, dict[str, str | None], str, str]:
        """Start a fresh conversation in this browser; the previous one is deleted (its memory freed).

        Returns:
            (the empty conversation, the session note, the browser's tokens, a notice, the sources note).
        """
        binder = self.services.binder
        binder.resolve(saved, request)
        await self.services.core()
        old = binder.peek(request)
        if old is not None and (self.running.of(old) or self.services.manager.is_busy(old)):
            return gr.skip(), gr.skip(), binder.saved(request), "Wait for the reply (or press Stop) first.", gr.skip()
        binder.rebind(request, None)
        if old is not None:
            with contextlib.suppress(chatkit.SessionNotFound):
                await self.services.manager.delete_session(old)
        return [], self._session_note(0), binder.saved(request), "A new conversation starts with your next message.", ""

    # -- double texting --------------------------------------------------------------------------
    async def double_text(
        self, message: str, count: float, policy: str, request: gr.Request
    ) -> tuple[list[Message], list[list[str]], str]:
        """Send ``count`` copies of ``message`` (numbered) at once under ``policy``; show what happened.

        The model is made slow (``burst_latency``) for these turns only, so the messages overlap.

        Returns:
            (the history, one table row per message: [message, outcome, reply], the policy's explanation).

        Raises:
            UserError: a bad message, policy or count, or a conversation without room for ``count`` more.
        """
        text = self._message(message)
        if policy not in POLICIES:
            raise UserError(f"Unknown policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        n = int(count)
        if not 1 <= n <= self.services.config.max_burst:
            raise UserError(f"Send between 1 and {self.services.config.max_burst} messages at once, not {n}.")
        sid = await self._session(request)
        stored = await self._stored(sid, request)
        self.budget.reserve(sid, n, stored=stored, limit=self.services.config.max_turns)
        try:
            outcomes, texts = await self._burst(sid, text, n, policy)
        finally:
            self.budget.release(sid, n)
        history = await self._history(sid, request)
        rows = [[t, *_describe_outcome(out)] for t, out in zip(texts, outcomes, strict=True)]
        return _chat_messages(history), rows, POLICY_HELP[policy]

    async def _burst(self, sid: str, text: str, n: int, policy: str) -> tuple[list[Any], list[str]]:
        texts = [f"{text} (#{i + 1} of {n})" for i in range(n)]
        manager = self.services.manager
        await self.services.ready()
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
        return list(outcomes), texts

    async def ui_double_text(
        self, message: str, count: float, policy: str, saved: object, request: gr.Request
    ) -> tuple[Any, Any, str, str, Any]:
        """:meth:`double_text` for the page: problems become the notice (the inputs keep their values).

        Returns:
            (the conversation, the outcome table, the policy's explanation, a notice, the browser's tokens).
        """
        skip = gr.skip()
        binder = self.services.binder
        try:
            binder.resolve(saved, request)
            history, rows, explanation = await self.double_text(message, count, policy, request)
        except UserError as exc:
            return skip, skip, skip, str(exc), binder.saved(request) if _has_page(request) else skip
        table = html_table(OUTCOME_HEADERS, rows, widths=["30%", "30%", "40%"], stack=True)
        return history, table, explanation, "", binder.saved(request)

    # -- API (gradio_client) ------------------------------------------------------------------------
    async def api_chat(self, message: str, request: gr.Request) -> tuple[list[Message], str]:
        """API: send ``message`` in the caller's own conversation; returns (its history, the sources note)."""
        try:
            text = self._message(message)
            sid = await self._session(request)
            result = await self._send(sid, text, request)
            return _chat_messages(await self._history(sid, request)), _sources_note(_sources_of(result))
        except UserError as exc:
            raise _ui_error(exc) from None

    async def _send(self, sid: str, text: str, request: gr.Request) -> Any:
        stored = await self._stored(sid, request)
        self.budget.reserve(sid, 1, stored=stored, limit=self.services.config.max_turns)
        try:
            await self.services.ready()
            return await self.services.manager.chat(sid, text)
        except chatkit.SessionNotFound:
            raise self._expired(request) from None
        except (ValueError, chatkit.ChatkitError) as exc:
            raise UserError(str(exc)) from None
        finally:
            self.budget.release(sid, 1)

    async def api_session(self, request: gr.Request) -> str:
        """API: the caller's own session id (created on first use)."""
        try:
            return await self._session(request)
        except UserError as exc:
            raise _ui_error(exc) from None

    async def api_history(self, session_id: str, request: gr.Request) -> list[Message]:
        """API: the history of ``session_id``, only if it belongs to the caller."""
        try:
            sid = await self._session(request, session_id)
            return _chat_messages(await self._history(sid, request))
        except UserError as exc:
            raise _ui_error(exc) from None

    async def api_send(self, session_id: str, message: str, request: gr.Request) -> str:
        """API: send ``message`` into ``session_id``, only if it belongs to the caller; returns the reply."""
        try:
            text = self._message(message)
            sid = await self._session(request, session_id)
            return str((await self._send(sid, text, request)).reply)
        except UserError as exc:
            raise _ui_error(exc) from None

    async def api_double_text(
        self, message: str, count: int, policy: str, request: gr.Request
    ) -> tuple[list[Message], list[list[str]], str]:
        """API: :meth:`double_text`."""
        try:
            return await self.double_text(message, count, policy, request)
        except UserError as exc:
            raise _ui_error(exc) from None


_STOPPED = object()
_END = object()


async def _until(awaitable: Any, stop: asyncio.Event) -> Any:
    """The result of ``awaitable`` (a future or coroutine), or ``_STOPPED`` if ``stop`` is set first
    (the awaitable then keeps running, the caller's to cancel); ``_END`` for a finished async iterator.
    If the caller is cancelled, so is the awaitable, and it is waited for (a stream's clean-up runs)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
        raise
    finally:
        stopper.cancel()
    if task.done():
        try:
            return task.result()
        except StopAsyncIteration:
            return _END
    return _STOPPED


def duration(seconds: float) -> str:
    """``1800`` -> ``"30 minutes"``, ``60`` -> ``"1 minute"``, ``90`` -> ``"90 seconds"``, ``7200`` -> ``"2 hours"``.

    >>> [duration(s) for s in (1800, 60, 90, 7200)]
    ['30 minutes', '1 minute', '90 seconds', '2 hours']
    """
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


def _full(limit: int) -> UserError:
    return UserError(
        f"This conversation reached its limit of {limit} messages. "
        "Press “New chat” to start a fresh one (your message stays in the box)."
    )


def _has_page(request: gr.Request | None) -> bool:
    return bool(getattr(request, "session_hash", None))


def _describe_outcome(outcome: object) -> tuple[str, str]:
    """(what happened, reply) for one double-texted message, from what its ``chat()`` call returned."""
    if isinstance(outcome, chatkit.SessionBusy):
        return "rejected at once (session busy); nothing stored", ""
    kept = getattr(outcome, "kept_message", None) if isinstance(outcome, chatkit.TurnInterrupted) else None
    if kept is not None:
        if kept:
            return "interrupted: its message stays in the history, without a reply", ""
        return "superseded: discarded, nothing of it kept", ""
    if isinstance(outcome, BaseException):
        return f"failed: {outcome or type(outcome).__name__}", ""
    return "answered", str(getattr(outcome, "reply", ""))
