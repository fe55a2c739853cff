"""Helpers shared by the CowVectorStore tests: a small store, one-chunk paragraphs, gated models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.documents import Document

from chatkit import CowVectorStore, HashEmbeddings

GATE_TIMEOUT = 30  # a safety net for a broken test, never a way to wait for something

# the tests' own thread for waiting on gates: never the event loop's default executor (a test may fill it)
_waiter = ThreadPoolExecutor(4, thread_name_prefix="test-gate-waiter")


def make(**kwargs: Any) -> CowVectorStore:
    """A store with 40-character chunks, no progress bar and no automatic compaction unless asked."""
    kwargs.setdefault("chunk_size", 40)
    kwargs.setdefault("chunk_overlap", 0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("compaction", "off")
    return CowVectorStore(kwargs.pop("embeddings", HashEmbeddings(dim=32)), **kwargs)


def paragraphs(*words: str) -> str:
    """One chunk per word: each paragraph is too long to share a 40-character chunk with another."""
    return "\n\n".join(f"{w} " + "z" * 25 for w in words)


def texts(docs: Sequence[Document]) -> list[str]:
    return [d.page_content.split()[0] for d in docs]


class Gates:
    """Named gates: ``pass_(name)`` (in the code under test) marks ``name`` entered, then waits until the
    test opens it."""

    def __init__(self, *names: str) -> None:
        self.entered = {n: threading.Event() for n in names}
        self.gates = {n: threading.Event() for n in names}
        self.threads: dict[str, str] = {}

    def pass_(self, name: str) -> None:
        if name in self.gates:
            self.threads[name] = threading.current_thread().name
            self.entered[name].set()
            if not self.gates[name].wait(GATE_TIMEOUT):
                raise TimeoutError(f"gate {name!r} never opened")

    def open(self, *names: str) -> None:
        for n in names or tuple(self.gates):
            self.gates[n].set()

    async def reached(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(_waiter, self.entered[name].wait, GATE_TIMEOUT)
        assert ok, f"{name!r} was never reached"


class GatedEmbeddings(HashEmbeddings):
    """embed_documents waits until the test opens the gate named by the first word of the first text."""

    def __init__(self, *names: str, dim: int = 32) -> None:
        super().__init__(dim=dim)
        self.gated = Gates(*names)
        self.entered = self.gated.entered
        self.gates = self.gated.gates
        self.threads = self.gated.threads

    def open(self, *names: str) -> None:
        """Open these gates (all when none are named)."""
        self.gated.open(*names)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.gated.pass_(texts[0].split()[0])
        return super().embed_documents(texts)


async def entered(emb: GatedEmbeddings, name: str) -> None:
    """Wait until ``name`` started embedding."""
    await emb.gated.reached(name)
