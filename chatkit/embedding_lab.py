"""Small embedding and retrieval experiments for notebook 5: a corpus, a similarity heatmap, hit rate at k,
indexing throughput.

Works with any LangChain ``Embeddings`` (the local MiniLM from :func:`chatkit.default_embeddings`, or
:class:`chatkit.HashEmbeddings` for a fast offline run) and any store with ``similarity_search(query, k)``.
numpy is imported on first use, matplotlib (the ``viz`` extra) when a chart is drawn.

Example:
    >>> from chatkit import HashEmbeddings
    >>> from chatkit.embedding_lab import similarity_matrix
    >>> m = similarity_matrix(HashEmbeddings(dim=64), ["a cat", "a cat", "the dog"])
    >>> [round(float(x), 2) for x in m[0]]
    [1.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._timeline_plot import new_figure

if TYPE_CHECKING:
    import numpy as np
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from matplotlib.figure import Figure

__all__ = [
    "LabelledQuestion",
    "RetrievalReport",
    "Throughput",
    "load_corpus",
    "load_questions",
    "similarity_matrix",
    "plot_similarity",
    "hit_rate_at_k",
    "measure_indexing",
    "plot_hit_rates",
]


class _Searchable(Protocol):
    def similarity_search(self, query: str, k: int = ...) -> list[Document]: ...


@dataclass(frozen=True, slots=True)
class LabelledQuestion:
    """A question and the corpus file that answers it."""

    question: str
    source: str


def load_corpus(directory: str | Path) -> dict[str, str]:
    """Every ``*.md`` file in ``directory`` except ``README.md``, as ``{file name: text}``, sorted by name.

    Raises:
        FileNotFoundError: ``directory`` does not exist or holds no markdown files.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no corpus directory at {root}")
    files = sorted(p for p in root.glob("*.md") if p.name.lower() != "readme.md")
    if not files:
        raise FileNotFoundError(f"no markdown files (other than README.md) in {root}")
    return {p.name: p.read_text(encoding="utf-8") for p in files}


def load_questions(path: str | Path) -> tuple[LabelledQuestion, ...]:
    """Read a JSON-lines file of ``{"question": ..., "source": ...}`` objects (blank lines ignored).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not such an object; the message names the line number.
    """
    out: list[LabelledQuestion] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question, source = item["question"], item["source"]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}:{n}: expected {{\"question\": ..., \"source\": ...}}, got {line[:80]!r}") from exc
        if not isinstance(question, str) or not isinstance(source, str) or not question.strip():
            raise ValueError(f"{path}:{n}: question and source must be non-empty strings")
        out.append(LabelledQuestion(question, source))
    return tuple(out)


def similarity_matrix(embeddings: Embeddings, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of every pair of ``texts`` (rows and columns in the order given).

    Raises:
        ValueError: no texts.
    """
    import numpy as np

    if not texts:
        raise ValueError("similarity_matrix() needs at least one text")
    vectors = np.asarray(embeddings.embed_documents(list(texts)), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit = vectors / norms
    return unit @ unit.T


def plot_similarity(
    matrix: np.ndarray,
    labels: Sequence[str],
    *,
    title: str | None = None,
    groups: Sequence[tuple[str, int]] | None = None,
    mask_diagonal: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A heatmap of a similarity matrix, labelled on both axes.

    Args:
        matrix: square, rows and columns in the order of ``labels``.
        labels: one per row.
        title: shown above the heatmap.
        groups: ``(name, size)`` of consecutive blocks of rows (e.g. topics, in the order the rows are):
            each block is outlined and named at the side.
        mask_diagonal: leave the diagonal blank (a text is always identical to itself: 1.0 would set the
            colour scale), and scale the colours to the other cells.
        vmin, vmax: the colour scale's ends (default: the cells shown).

    Raises:
        ValueError: the matrix is not square or does not match the labels, or the groups do not add up to
            the number of labels.

    Example:
        >>> import numpy as np
        >>> m = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> fig = plot_similarity(m, ["a", "b", "c"], groups=[("ab", 2), ("c", 1)], mask_diagonal=True)
        >>> fig.axes[1].get_ylim()  # the colour bar spans the off-diagonal cells
        (np.float64(0.1), np.float64(0.8))
    """
    import numpy as np

    from ._optional import optional_import

    Rectangle = optional_import("matplotlib.patches", extra="viz", feature="plot_similarity()").Rectangle

    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(labels):
        raise ValueError(f"need a square matrix matching {len(labels)} labels, got shape {matrix.shape}")
    if groups is not None and sum(size for _, size in groups) != len(labels):
        raise ValueError(f"groups cover {sum(size for _, size in groups)} rows, the matrix has {len(labels)}")
    n = len(labels)
    shown = np.array(matrix, dtype=float)
    if mask_diagonal:
        np.fill_diagonal(shown, np.nan)
    cells = shown[~np.isnan(shown)] if mask_diagonal else shown.ravel()
    low = float(cells.min()) if vmin is None and cells.size else (0.0 if vmin is None else vmin)
    high = float(cells.max()) if vmax is None and cells.size else (1.0 if vmax is None else vmax)
    if not mask_diagonal and vmin is None:
        low = min(0.0, low)
    size = max(4.0, 0.32 * n + 2.5)
    fig = new_figure(figsize=(size + (2.4 if groups else 1.2), size), feature="plot_similarity()")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(n), labels=labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=labels, fontsize=7)
    if groups:
        start = 0
        for name, count in groups:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), count, count, fill=False, edgecolor="white", linewidth=1.6))
            ax.annotate(name, (n - 0.5, start - 0.5 + count / 2), xytext=(6, 0), textcoords="offset points",
                        va="center", ha="left", fontsize=8, annotation_clip=False)
            start += count
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity" + (" (diagonal left out)" if mask_diagonal else ""),
                 pad=0.14 if groups else 0.05)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


@dataclass(frozen=True, slots=True)
class RetrievalReport:
    """Hit rate at k on a labelled question set.

    Attributes:
        ks: the cut-offs measured, ascending.
        hits: for each k, how many questions had their expected source among the top-k results.
        questions: how many questions were asked.
        misses: ``(question, expected source, top-1 source)`` for each question missed at the largest k.
    """

    ks: tuple[int, ...]
    hits: tuple[int, ...]
    questions: int
    misses: tuple[tuple[str, str, str], ...]

    @property
    def hit_rates(self) -> tuple[float, ...]:
        """``hits / questions`` for each k."""
        return tuple(h / self.questions for h in self.hits)

    def table(self) -> str:
        """A small fixed-width table: k, hits, hit rate."""
        rows = zip(self.ks, self.hits, strict=True)
        lines = ["  k   hits   hit rate", *(f"{k:>3}  {h:>2}/{self.questions:<3} {h / self.questions:>7.1%}" for k, h in rows)]
        return "\n".join(lines)

    def plot(self, *, title: str | None = None) -> Figure:
        """Hit rate against k."""
        fig = new_figure(figsize=(5.5, 3.2), feature="RetrievalReport.plot()")
        ax = fig.add_subplot()
        ax.plot(self.ks, self.hit_rates, marker="o")
        for k, rate in zip(self.ks, self.hit_rates, strict=True):
            ax.annotate(f"{rate:.0%}", (k, rate), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
        ax.set_xticks(self.ks)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("k (results returned)")
        ax.set_ylabel("hit rate")
        ax.grid(alpha=0.3)
        ax.set_title(title or f"hit rate at k ({self.questions} questions)", fontsize=10)
        return fig


def hit_rate_at_k(
    store: _Searchable, questions: Sequence[LabelledQuestion], *, ks: Sequence[int] = (1, 3, 5)
) -> RetrievalReport:
    """Ask every question and check whether its expected source is among the top-k results' sources.

    A result's source is ``metadata["source"]``; only its file name is compared, so ``data/x.md`` and
    ``x.md`` match.

    Raises:
        ValueError: no questions, or a k below 1.
    """
    if not questions:
        raise ValueError("hit_rate_at_k() needs at least one question")
    cutoffs = tuple(sorted(set(ks)))
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"every k must be >= 1, got {tuple(ks)!r}")
    hits = [0] * len(cutoffs)
    misses: list[tuple[str, str, str]] = []
    for q in questions:
        docs = store.similarity_search(q.question, k=cutoffs[-1])
        sources = [Path(str((d.metadata or {}).get("source", ""))).name for d in docs]
        for i, k in enumerate(cutoffs):
            if q.source in sources[:k]:
                hits[i] += 1
        if q.source not in sources:
            misses.append((q.question, q.source, sources[0] if sources else ""))
    return RetrievalReport(cutoffs, tuple(hits), len(questions), tuple(misses))


@dataclass(frozen=True, slots=True)
class Throughput:
    """How fast a corpus was indexed.

    Attributes:
        documents: documents indexed.
        chunks: chunks embedded and published.
        seconds: wall time.
    """

    documents: int
    chunks: int
    seconds: float

    @property
    def chunks_per_second(self) -> float:
        """Chunks indexed per second of wall time."""
        return self.chunks / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line with the counts and the rate."""
        return (
            f"indexed {self.documents} documents ({self.chunks} chunks) in {self.seconds:.2f} s: "
            f"{self.chunks_per_second:.0f} chunks/s"
        )


async def measure_indexing(
    index: Callable[[Mapping[str, str]], Awaitable[Any]],
    corpus: Mapping[str, str],
    *,
    count_chunks: Callable[[Any], int],
) -> Throughput:
    """Time ``await index(corpus)`` and count the chunks it reports with ``count_chunks(result)``."""
    start = time.perf_counter()
    result = await index(corpus)
    seconds = time.perf_counter() - start
    return Throughput(len(corpus), count_chunks(result), seconds)


def plot_hit_rates(reports: Mapping[str, RetrievalReport], *, title: str | None = None) -> Figure:
    """Several :class:`RetrievalReport` s on one hit-rate-at-k chart (one line per embedding model).

    Raises:
        ValueError: no reports.
    """
    if not reports:
        raise ValueError("plot_hit_rates() needs at least one report")
    fig = new_figure(figsize=(6, 3.4), feature="plot_hit_rates()")
    ax = fig.add_subplot()
    for name, report in reports.items():
        ax.plot(report.ks, report.hit_rates, marker="o", label=name)
        for k, rate in zip(report.ks, report.hit_rates, strict=True):
            ax.annotate(f"{rate:.0%}", (k, rate), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
    ks = sorted({k for r in reports.values() for k in r.ks})
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("k (results returned)")
    ax.set_ylabel("hit rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    questions = next(iter(reports.values())).questions
    ax.set_title(title or f"hit rate at k ({questions} labelled questions)", fontsize=10)
    return fig
