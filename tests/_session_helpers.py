"""Deterministic controls for session tests: gated model latency, a stalling streaming model, a gated checkpointer
and vector store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk
from langchain_core.outputs import ChatResult as LCChatResult
from langchain_core.vectorstores import InMemoryVectorStore
from langgraph.checkpoint.memory import InMemorySaver

from chatkit import HashEmbeddings
from chatkit.sessions import ChatMessage


class Gates:
    """A latency callable for ExtractiveChatModel: each message's reply waits until the test releases it.

    ``started`` lists the messages whose model call began, in order; ``fail(text)`` makes that message's
    model call raise once released.
    """

    def __init__(self, *, open_all: bool = False) -> None:
        self.open_all = open_all
        self.started: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self._entered: dict[str, asyncio.Event] = {}
        self._failing: set[str] = set()

    def _event(self, table: dict[str, asyncio.Event], text: str) -> asyncio.Event:
        if text not in table:
            table[text] = asyncio.Event()
        return table[text]

    def __call__(self, text: str) -> Any:
        self.started.append(text)
        self._event(self._entered, text).set()
        return self._wait(text)

    async def _wait(self, text: str) -> None:
        if not self.open_all:
            await self._event(self._release, text).wait()
        if text in self._failing:
            raise RuntimeError(f"model failed on {text!r}")

    def release(self, *texts: str) -> None:
        for text in texts:
            self._event(self._release, text).set()

    def fail(self, text: str) -> None:
        self._failing.add(text)

    async def entered(self, text: str) -> None:
        """Wait until the model call for ``text`` has begun."""
        await self._event(self._entered, text).wait()


class GatedSaver(InMemorySaver):
    """An InMemorySaver whose next read or write can be held at its ``await`` (or made to fail)."""

    def __init__(self) -> None:
        super().__init__()
        self._gates: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}
        self._errors: dict[str, BaseException] = {}

    def hold(self, op: str) -> tuple[asyncio.Event, asyncio.Event]:
        """Hold the next ``op`` (``"read"`` or ``"write"``): returns (entered, release) events."""
        gate = (asyncio.Event(), asyncio.Event())
        self._gates[op] = gate
        return gate

    def fail_next(self, op: str, exc: BaseException) -> None:
        self._errors[op] = exc

    async def _gate(self, op: str) -> None:
        gate = self._gates.pop(op, None)
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        exc = self._errors.pop(op, None)
        if exc is not None:
            raise exc

    async def aget_tuple(self, config: Any) -> Any:
        await self._gate("read")
        return await super().aget_tuple(config)

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        await self._gate("write")
        return await super().aput(config, checkpoint, metadata, new_versions)


class GatedStore(InMemoryVectorStore):
    """An InMemoryVectorStore whose next search can be held at its ``await`` (or made to fail)."""

    def __init__(self) -> None:
        super().__init__(embedding=HashEmbeddings(dim=64))
        self._gate: tuple[asyncio.Event, asyncio.Event] | None = None
        self._error: BaseException | None = None

    def hold(self) -> tuple[asyncio.Event, asyncio.Event]:
        self._gate = (asyncio.Event(), asyncio.Event())
        return self._gate

    def fail_next(self, exc: BaseException) -> None:
        self._error = exc

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate[0].set()
            await gate[1].wait()
        exc, self._error = self._error, None
        if exc is not None:
            raise exc
        return await super().asimilarity_search(query, k=k, **kwargs)


def reply_to(text: str, n: int) -> str:
    """ExtractiveChatModel's reply without context to the n-th user message ``text``."""
    return f'Message {n}: you said "{text}". I found no documents to answer from.'


def pairs(history: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in history]


def conversation(*texts: str) -> list[tuple[str, str]]:
    """The expected history after ``texts`` were answered in order."""
    out: list[tuple[str, str]] = []
    for n, text in enumerate(texts, 1):
        out += [("user", text), ("assistant", reply_to(text, n))]
    return out


async def until(condition: Callable[[], bool], *, give_up_after: float = 60.0) -> None:
    """Yield to the event loop until ``condition()`` holds; fail if it never does.

    This waits for an event, not for time: it returns the moment the condition holds, usually after a few
    rounds. A fixed number of rounds is not enough, though: some steps run in worker threads (LangGraph
    runs sync callbacks in an executor), and on a loaded machine they may take any number of rounds. So the
    bound is real time (``time.monotonic``, never the fake loop clock a test may patch in), only there to
    fail a stuck test instead of hanging it.
    """
    deadline = time.monotonic() + give_up_after
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition never became true (gave up after {give_up_after:g} s)")
        await asyncio.sleep(0)


class StallingModel(BaseChatModel):
    """A streaming chat model that sends its first chunk at once and the rest only after ``go`` is set.

    ``reply`` is the whole reply; it splits after its first word.
    """

    go: Any = None
    reply: str = "first rest of the reply"

    @property
    def _llm_type(self) -> str:
        return "stalling"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> LCChatResult:
        return LCChatResult(generations=[ChatGeneration(message=AIMessage(self.reply))])

    async def _astream(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        head, _, tail = self.reply.partition(" ")
        yield ChatGenerationChunk(message=AIMessageChunk(head + " "))
        if self.go is not None:
            await self.go.wait()
        yield ChatGenerationChunk(message=AIMessageChunk(tail))
