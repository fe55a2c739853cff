"""Double texting: what each ``SessionManager`` policy does with a message sent while the previous one is answered."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..timeline import Timeline, lane, plot_timelines
from ._common import FakeLLM, InFlight, RecordingSaver, _GatedTimeline, _reply_owner, mark_lost_updates

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PolicyResult",
    "PolicyComparison",
    "double_texting",
    "compare_double_texting",
]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What one double-texting policy did with a second message sent while the first was being answered.

    Attributes:
        policy: ``"enqueue"``, ``"reject"``, ``"interrupt"``, ``"rollback"``, or ``"no lock"`` (the naive
            service, for contrast).
        outcomes: per message, ``"replied"`` or the exception's class name (``SessionBusy``, ``TurnInterrupted``).
        history: the session's history afterwards, as ``"user: ..."`` / ``"assistant: ..."`` lines.
        expected: the history the policy promises.
        timeline: the two turns, and when the second message arrived.
    """

    policy: str
    outcomes: tuple[str, ...]
    history: tuple[str, ...]
    expected: tuple[str, ...]
    timeline: Timeline = field(repr=False)

    @property
    def ok(self) -> bool:
        """Whether the history is exactly what the policy promises."""
        return self.history == self.expected

    def summary(self) -> str:
        """Deterministic lines: each message's outcome, then the history."""
        lines = [f"{self.policy}: " + ", ".join(f"message {i + 1} {o}" for i, o in enumerate(self.outcomes))]
        lines += [f"    {h}" for h in self.history] or ["    (empty history)"]
        if not self.ok:
            lines.append("    ANOMALY: expected " + " | ".join(self.expected))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PolicyComparison:
    """All double-texting policies, side by side."""

    results: tuple[PolicyResult, ...]

    def summary(self) -> str:
        """Every policy's summary."""
        return "\n".join(r.summary() for r in self.results)

    def plot(self, *, width: float = 10.0) -> Figure:
        """One timeline per policy, each on its own time axis."""
        return plot_timelines({r.policy: r.timeline for r in self.results}, width=width, sharex=False)

    def _repr_html_(self) -> str:
        from .._timeline_plot import figure_html

        return figure_html(self.plot(), alt="double-texting policies")


_DOUBLE_TEXT = ("Tell me about locks.", "Actually, tell me about FIFO queues.")


async def double_texting(policy: str, *, latency: float = 0.06) -> PolicyResult:
    """Send message 1, and while its reply is being computed, send message 2 with ``policy``.

    Sequenced by events, not timing: message 1's model thinks for ``latency / 2``, then message 2 is sent,
    and message 1's model goes on only once message 2 has arrived (queued for the lock, been refused,
    or, without a lock, reached the model): another ``latency / 2``; message 2's model takes
    ``latency / 3`` (a :class:`FakeLLM`: when both think at once, message 2 answers first).
    ``policy="no lock"`` runs the naive ``SessionManager(locking=False)`` instead, for contrast.

    The timeline has each turn's lock and model spans (cancelled ones outlined in red), what each turn
    read and wrote (``saw N messages``, ``wrote N messages``: with ``interrupt`` message 1 writes its
    question alone, with ``rollback`` nothing), when message 2 was sent, the ``SessionBusy`` refusal,
    the interruption, and (without a lock) the turn a later write erased.

    Raises:
        ValueError: an unknown policy or a negative latency.
    """
    from ..sessions.types import POLICIES
    from ..models import ExtractiveChatModel
    from ..sessions import SessionManager

    if policy not in (*POLICIES, "no lock"):
        raise ValueError(f"policy must be one of {(*POLICIES, 'no lock')!r}, got {policy!r}")
    if latency < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
    first, second = _DOUBLE_TEXT
    halfway = asyncio.Event()
    # message 2 is "in flight" once it queued for the lock, was refused, or (no lock) reached the model
    second_arrived = InFlight(["message 2"])
    llm = FakeLLM(seconds={"message 2": latency / 3, "message 1": latency / 2})  # message 2 first, even on a tie

    async def model_latency(text: str) -> None:
        if text == first:
            await asyncio.sleep(latency / 2)  # message 1 is visibly under way...
            halfway.set()  # ...when message 2 is sent
            await second_arrived.wait()  # message 1 is still running when message 2 arrives, always
            await llm((), text, who="message 1")
        else:
            second_arrived.mark("message 2")
            await llm((), text, who="message 2")

    timeline = _GatedTimeline(second_arrived)
    locking = policy != "no lock"
    saver = RecordingSaver(timeline)
    manager = SessionManager(
        model=ExtractiveChatModel(latency=model_latency),
        locking=locking,
        timeline=timeline,
        policy="enqueue",
        checkpointer=saver,
    )
    sid = await manager.create_session()

    async def send(name: str, text: str, how: str | None) -> Any:
        with lane(name):
            try:
                return await manager.chat(sid, text, policy=how)  # type: ignore[arg-type]
            except Exception as exc:
                if type(exc).__name__ != "TurnInterrupted":  # the manager marks interruptions itself
                    timeline.mark(type(exc).__name__, key=sid, detail=f"{type(exc).__name__}: refused at once")
                    second_arrived.mark(name)  # refused at once (policy "reject"): it did arrive
                raise

    timeline.clear()
    one = asyncio.create_task(send("message 1", first, None), name="message 1")
    await halfway.wait()
    timeline.mark("sent", who="message 2", key=sid, detail="message 2 sent")
    two = asyncio.create_task(send("message 2", second, policy if locking else None), name="message 2")
    outcomes = await asyncio.gather(one, two, return_exceptions=True)
    saver.recording = False
    history = await manager.get_history(sid)
    lines = tuple(f"{m.role}: {_short(m.content, (first, second))}" for m in history)
    u1, u2 = f"user: {first}", f"user: {second}"
    a1, a2 = "assistant: reply to message 1", "assistant: reply to message 2"
    expected = {
        "enqueue": (u1, a1, u2, a2),
        "reject": (u1, a1),
        "interrupt": (u1, u2, a2),
        "rollback": (u2, a2),
        "no lock": (u1, a1, u2, a2),  # what the user wanted; the naive service does not deliver it
    }[policy]
    if not locking:
        mark_lost_updates(timeline, what="lost turn")
    return PolicyResult(
        policy=policy,
        outcomes=tuple("replied" if not isinstance(o, BaseException) else type(o).__name__ for o in outcomes),
        history=lines,
        expected=expected,
        timeline=timeline,
    )


def _short(content: str, questions: tuple[str, str]) -> str:
    """A user message as is; a reply as ``reply to message N`` (N = the question it quotes)."""
    if content in questions:
        return content
    owner = _reply_owner(content, questions)
    return f"reply to message {questions.index(owner) + 1}" if owner is not None else content


async def compare_double_texting(*, latency: float = 0.06, include_naive: bool = True) -> PolicyComparison:
    """Run :func:`double_texting` for every policy (and the naive service first, if ``include_naive``)."""
    from ..sessions.types import POLICIES

    policies = (("no lock",) if include_naive else ()) + tuple(POLICIES)
    return PolicyComparison(tuple([await double_texting(p, latency=latency) for p in policies]))
