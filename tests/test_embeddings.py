"""HashEmbeddings (deterministic, offline) and the bundled local model."""

from __future__ import annotations

import math

import pytest
from langchain_core.embeddings import Embeddings

from chatkit import HashEmbeddings
from chatkit.embeddings import embedding_dimension


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_hash_embeddings_are_fixed_unit_vectors_of_the_words() -> None:
    emb = HashEmbeddings(dim=8)
    assert isinstance(emb, Embeddings) and emb.dim == 8 and repr(emb) == "HashEmbeddings(dim=8)"
    # pinned: BLAKE2b hashing gives the same vector in every process and on every machine
    assert emb.embed_query("cat") == [0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    assert emb.embed_query("Cat, cat!") == emb.embed_query("cat")  # case and punctuation do not matter
    docs = emb.embed_documents(["the cat sat on the mat", "a dog barked", ""])
    assert [round(math.fsum(x * x for x in v), 9) for v in docs] == [1.0, 1.0, 0.0]
    assert docs[0] == HashEmbeddings(dim=8).embed_query("the cat sat on the mat")
    assert HashEmbeddings(dim=8) == emb and hash(HashEmbeddings(dim=8)) == hash(emb) and HashEmbeddings(dim=9) != emb


def test_shared_words_mean_similar_vectors() -> None:
    emb = HashEmbeddings(dim=256)
    q = emb.embed_query("refund policy")
    near, far = emb.embed_documents(["our refund policy explained", "shipping times by country"])
    assert cosine(q, near) > 0.5 and cosine(q, far) == 0.0


@pytest.mark.parametrize(("dim", "error"), [(1, ValueError), (0, ValueError), (8.0, TypeError), (True, TypeError)])
def test_bad_dimensions_are_rejected(dim: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="dim must"):
        HashEmbeddings(dim=dim)  # type: ignore[arg-type]


def test_non_text_input_is_rejected() -> None:
    with pytest.raises(TypeError, match="texts to embed must be str"):
        HashEmbeddings().embed_documents([b"bytes"])  # type: ignore[list-item]


def test_embedding_dimension_reads_dim_or_asks_the_model() -> None:
    class NoDim(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [[1.0, 0.0, 0.0] for _ in texts]

        def embed_query(self, text: str) -> list[float]:
            return [1.0, 0.0, 0.0]

    assert embedding_dimension(HashEmbeddings(dim=12)) == 12
    assert embedding_dimension(NoDim()) == 3
