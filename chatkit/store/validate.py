"""Argument checks shared by the vector stores: each raises TypeError/ValueError naming the bad value."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .records import CHUNK_KEY, SOURCE_KEY, VERSION_KEY

__all__ = [
    "check_source",
    "check_content",
    "check_metadata",
    "check_storable",
    "check_text",
    "MAX_METADATA_DEPTH",
    "check_k",
    "check_lambda",
    "check_positive_int",
    "as_query_vector",
    "as_matrix",
]

# metadata nested deeper than this is refused when added (a saved store must load back)
MAX_METADATA_DEPTH = 32


def check_text(text: str, what: str) -> str:
    """``text`` unchanged, if it can be saved as UTF-8 (no lone surrogate such as ``'\\ud800'``).

    Raises:
        ValueError: a lone surrogate, named with its position.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise ValueError(
            f"{what} holds a lone surrogate {bad!r} at position {exc.start}: it cannot be saved as UTF-8 "
            "(decode the original bytes with errors='replace', or remove it)"
        ) from None
    return text


def check_storable(metadata: Mapping[str, Any], owner: str) -> None:
    """Refuse metadata that a save/load round trip would change or that would make every save fail:
    non-str keys (JSON turns them into str), tuples (they come back as lists), lone surrogates (not
    UTF-8), and nesting deeper than :data:`MAX_METADATA_DEPTH`. Other values are the save's concern.

    Raises:
        TypeError: a non-str key or a tuple, named with its path (``metadata['a'][0]``).
        ValueError: a lone surrogate, or too deep.
    """
    stack: list[tuple[Any, str, int]] = [(metadata, "metadata", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            check_text(value, f"{path} of {owner}")
        elif isinstance(value, Mapping):
            if depth >= MAX_METADATA_DEPTH:
                raise ValueError(f"{path} of {owner} is nested more than {MAX_METADATA_DEPTH} levels deep")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"metadata keys must be str: {path} of {owner} has the {type(key).__name__} key {key!r:.60}"
                        " (a save would turn it into a str)"
                    )
                check_text(key, f"the key {key!r:.60} in {path} of {owner}")
                stack.append((item, f"{path}[{key!r:.60}]", depth + 1))
        elif isinstance(value, tuple):
            raise TypeError(f"{path} of {owner} is a tuple {value!r:.60}: use a list (a save would turn it into one)")
        elif isinstance(value, list):
            if depth >= MAX_METADATA_DEPTH:
                raise ValueError(f"{path} of {owner} is nested more than {MAX_METADATA_DEPTH} levels deep")
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def check_source(source: object) -> str:
    """A document name: a non-empty str that can be saved."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__} {source!r:.80}")
    if not source.strip():
        raise ValueError(f"source must be a non-empty name, got {source!r}")
    return check_text(source, f"the source name {source!r:.80}")


def check_content(content: object, source: str) -> str:
    """A document's text: a str with something besides whitespace, that can be saved."""
    if not isinstance(content, str):
        raise TypeError(f"content of {source!r} must be a str, got {type(content).__name__}")
    if not content.strip():
        raise ValueError(f"content of {source!r} is empty or whitespace only; use remove_document to delete it")
    return check_text(content, f"the content of {source!r}")


def check_metadata(metadata: object, source: str) -> dict[str, Any]:
    """User metadata for ``add_document``: a mapping with str keys, not overriding the stamped keys, that
    a save/load round trip keeps as it is (:func:`check_storable`); returned as a deep copy."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata of {source!r} must be a dict or None, got {type(metadata).__name__}")
    check_storable(metadata, repr(source))
    for key in (CHUNK_KEY, VERSION_KEY):
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is set by the store; remove it from the metadata of {source!r}")
    if SOURCE_KEY in metadata and metadata[SOURCE_KEY] != source:
        raise ValueError(
            f"metadata says source {metadata[SOURCE_KEY]!r} but the document is added as {source!r}"
        )
    return copy.deepcopy(dict(metadata))


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """An int (not bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_store_config(embeddings: object, chunk_size: object, chunk_overlap: object) -> tuple[int, int]:
    """Validate what both stores take: LangChain embeddings (or None) and a chunk size above the overlap."""
    from langchain_core.embeddings import Embeddings

    if embeddings is not None and not isinstance(embeddings, Embeddings):
        raise TypeError(f"embeddings must be a LangChain Embeddings or None, got {type(embeddings).__name__}")
    size = check_positive_int("chunk_size", chunk_size)
    overlap = check_positive_int("chunk_overlap", chunk_overlap, minimum=0)
    if overlap >= size:
        raise ValueError(f"chunk_overlap ({overlap}) must be smaller than chunk_size ({size})")
    return size, overlap


def check_k(k: object) -> int:
    """The number of results asked for: an int of at least 1."""
    return check_positive_int("k", k)


def as_query_vector(vector: object, dim: int | None) -> np.ndarray:
    """A (1, dim) float32, L2-normalised copy of ``vector``.

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: wrong length, not 1-D, or NaN/infinite values.
    """
    try:
        arr = np.array(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"an embedding must be a sequence of numbers, got {type(vector).__name__}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"an embedding must be a non-empty 1-D vector, got shape {arr.shape}")
    if dim is not None and arr.shape[0] != dim:
        raise ValueError(f"embedding has {arr.shape[0]} dimensions but the store holds {dim}-d vectors")
    if not np.isfinite(arr).all():
        raise ValueError("embedding contains NaN or infinite values")
    out = arr.reshape(1, -1)
    _normalize_rows(out)
    return out


def as_matrix(vectors: Sequence[Sequence[float]], n: int, dim: int | None, who: str) -> np.ndarray:
    """An (n, dim) float32 C-contiguous matrix with L2-normalised rows, from an embedding model's output.

    Raises:
        ValueError: the model returned the wrong number of vectors, ragged or wrong-sized vectors, or NaN.
    """
    if len(vectors) != n:
        raise ValueError(f"{who} returned {len(vectors)} vectors for {n} texts")
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    try:
        arr = np.array(vectors, dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"{who} returned vectors of different lengths") from exc
    if arr.ndim != 2:
        raise ValueError(f"{who} returned vectors of different lengths (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{who} returned {arr.shape[1]}-d vectors but the store holds {dim}-d vectors")
    if not np.isfinite(arr).all():
        raise ValueError(f"{who} returned NaN or infinite values")
    arr = np.ascontiguousarray(arr)
    _normalize_rows(arr)
    return arr


def _normalize_rows(arr: np.ndarray) -> None:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    np.divide(arr, norms, out=arr, where=norms > 0)


def check_lambda(lambda_mult: object) -> float:
    """MMR's trade-off: a number in [0, 1]."""
    if isinstance(lambda_mult, bool) or not isinstance(lambda_mult, (int, float)):
        raise TypeError(f"lambda_mult must be a number in [0, 1], got {lambda_mult!r}")
    if math.isnan(lambda_mult) or not 0.0 <= lambda_mult <= 1.0:
        raise ValueError(f"lambda_mult must be in [0, 1], got {lambda_mult!r}")
    return float(lambda_mult)
