"""The knowledge base in ``data/``: facts checked against the libraries, and a question set that measures
understanding rather than string matching."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chatkit.embedding_lab import load_corpus, load_questions

DATA = Path(__file__).resolve().parent.parent / "data"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _longest_shared_run(question: str, document: str) -> str:
    """The longest run of consecutive words of ``question`` that also appears in ``document``."""
    q, doc = _words(question), " " + " ".join(_words(document)) + " "
    best = ""
    for a in range(len(q)):
        for b in range(a + len(best.split()) + 1, len(q) + 1):
            run = " ".join(q[a:b])
            if f" {run} " not in doc:
                break
            best = run
    return best


def test_questions_do_not_reuse_their_documents_wording() -> None:
    # data/retrieval-evaluation.md: copying sentences from the documents measures string matching,
    # not understanding. A technical term (three words at most) may be shared; a phrase may not.
    corpus = load_corpus(DATA)
    questions = load_questions(DATA / "questions.jsonl")
    assert len(questions) >= 68
    copied = {
        q.question: run
        for q in questions
        if len((run := _longest_shared_run(q.question, corpus[q.source])).split()) >= 4
    }
    assert copied == {}


def test_every_question_is_labelled_with_a_file_of_the_corpus() -> None:
    corpus = load_corpus(DATA)
    questions = load_questions(DATA / "questions.jsonl")
    assert all(q.source in corpus for q in questions)
    assert len({q.question for q in questions}) == len(questions)


def test_faiss_hnsw_has_no_removal_and_the_corpus_says_so() -> None:
    faiss = pytest.importorskip("faiss")
    np = pytest.importorskip("numpy")
    index = faiss.IndexHNSWFlat(8, 16)
    index.add(np.eye(8, dtype="float32"))
    with pytest.raises(RuntimeError, match="not implemented"):
        index.remove_ids(np.array([1], dtype="int64"))
    text = (DATA / "faiss-vector-search.md").read_text(encoding="utf-8")
    hnsw = next(line for line in text.splitlines() if "IndexHNSWFlat" in line)
    assert "slow deletion" not in hnsw and "not supported" in hnsw


def test_lock_striping_is_described_as_a_fixed_pool_of_locks() -> None:
    text = (DATA / "per-key-locks.md").read_text(encoding="utf-8")
    assert "striping scheme) gives every resource identifier its own mutex" not in text
    striping = next(p for p in text.split("\n\n") if p.startswith("Lock striping"))
    assert "fixed pool" in striping and "hash(key) % N" in striping


def test_embedding_throughput_is_stated_as_measured() -> None:
    # notebook 5 measures a few tens of ~300-character chunks per second on a 2-core CPU
    text = (DATA / "embeddings.md").read_text(encoding="utf-8")
    assert "hundreds of short passages per second" not in text
    assert "tens of chunks per second" in text
