"""chatkit.embedding_lab: corpus loading, similarity, hit rate at k (offline, with HashEmbeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document

from chatkit import HashEmbeddings
from chatkit.embedding_lab import (
    LabelledQuestion,
    hit_rate_at_k,
    load_corpus,
    load_questions,
    plot_hit_rates,
    plot_similarity,
    similarity_matrix,
)

DATA = Path(__file__).resolve().parent.parent / "data"


class FakeStore:
    """Answers each query with fixed sources, best first."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    def similarity_search(self, query: str, k: int = 4) -> list[Document]:
        return [Document("x", metadata={"source": f"data/{s}"}) for s in self.answers[query][:k]]


def test_hit_rate_at_k_counts_the_expected_source_in_the_top_k() -> None:
    store = FakeStore({"q1": ["a.md", "b.md"], "q2": ["c.md", "b.md"], "q3": ["c.md", "c.md"]})
    questions = [LabelledQuestion("q1", "a.md"), LabelledQuestion("q2", "b.md"), LabelledQuestion("q3", "a.md")]
    report = hit_rate_at_k(store, questions, ks=(2, 1))
    assert report.ks == (1, 2) and report.hits == (1, 2) and report.questions == 3
    assert report.misses == (("q3", "a.md", "c.md"),)
    assert report.table().splitlines()[1:] == ["  1   1/3     33.3%", "  2   2/3     66.7%"]
    assert len(report.plot().axes) == 1
    assert len(plot_hit_rates({"fake": report}).axes[0].lines) == 1


@pytest.mark.parametrize(("questions", "ks"), [([], (1,)), ([LabelledQuestion("q", "a.md")], (0, 1))])
def test_hit_rate_at_k_rejects_bad_input(questions: list[LabelledQuestion], ks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        hit_rate_at_k(FakeStore({}), questions, ks=ks)


def test_the_shipped_corpus_and_questions_load() -> None:
    corpus = load_corpus(DATA)
    questions = load_questions(DATA / "questions.jsonl")
    assert "README.md" not in corpus and len(corpus) >= 15
    assert len(questions) >= 40 and all(q.source in corpus for q in questions)


def test_load_questions_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?", "source": "a.md"}\n\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"q\.jsonl:3"):
        load_questions(path)


def test_load_corpus_needs_markdown(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")


def test_similarity_matrix_and_heatmap() -> None:
    matrix = similarity_matrix(HashEmbeddings(dim=64), ["a cat", "a cat", "dogs bark"])
    assert matrix.shape == (3, 3) and round(float(matrix[0, 1]), 6) == 1.0
    fig = plot_similarity(matrix, ["x", "y", "z"], title="t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="square"):
        plot_similarity(matrix, ["x", "y"])


def test_heatmap_can_leave_out_the_diagonal_and_outline_topic_blocks() -> None:
    import numpy as np

    m = np.array([[1.0, 0.6, 0.1, 0.2], [0.6, 1.0, 0.15, 0.1], [0.1, 0.15, 1.0, 0.5], [0.2, 0.1, 0.5, 1.0]])
    fig = plot_similarity(m, list("abcd"), groups=[("first", 2), ("second", 2)], mask_diagonal=True)
    ax, bar = fig.axes
    image = ax.get_images()[0].get_array()
    assert np.ma.is_masked(image[0, 0]) and image[0, 1] == 0.6  # the diagonal is not drawn
    assert bar.get_ylim() == (0.1, 0.6)  # the scale is not saturated by the 1.0 diagonal
    assert [p.get_width() for p in ax.patches] == [2, 2]  # one outline per topic
    assert {"first", "second"} <= {t.get_text() for t in ax.texts}
    with pytest.raises(ValueError, match="groups cover 3"):
        plot_similarity(m, list("abcd"), groups=[("x", 3)])
