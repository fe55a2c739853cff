"""Embed many texts in batches, with a tqdm progress bar that suits the terminal or the notebook.

Each batch's vectors are converted (to a float32 matrix) as soon as the model returns them: converting
4,000 vectors in one step would hold the GIL for tens of milliseconds, stalling every other thread (the
event loop's among them); a batch at a time keeps each step short.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from langchain_core.embeddings import Embeddings

__all__ = ["embed_in_batches", "PROGRESS_MIN_TEXTS"]

T = TypeVar("T")

# below this many texts no bar is shown: it would flash by
PROGRESS_MIN_TEXTS = 128


def _in_notebook_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:  # pragma: no cover - a very old IPython
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _tqdm_class() -> Any:
    """tqdm's notebook widget inside a Jupyter kernel with ipywidgets, the text bar everywhere else.

    (``tqdm.auto`` would warn when a kernel lacks ipywidgets; this falls back to the text bar silently.)
    """
    if _in_notebook_kernel() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    from tqdm import tqdm as text_tqdm

    return text_tqdm


def embed_in_batches(
    embeddings: Embeddings,
    texts: Sequence[str],
    *,
    batch_size: int,
    progress: bool,
    convert: Callable[[Any, int], T],
    desc: str = "embedding",
) -> list[T]:
    """``embeddings.embed_documents`` on ``batch_size`` texts per call, with an optional progress bar;
    returns ``convert(vectors, len(batch))`` of each call, in order.

    The bar appears only when ``progress`` is true and there are at least :data:`PROGRESS_MIN_TEXTS` texts.
    """
    if len(texts) <= batch_size and not (progress and len(texts) >= PROGRESS_MIN_TEXTS):
        return [convert(embeddings.embed_documents(list(texts)), len(texts))]
    bar = None
    if progress and len(texts) >= PROGRESS_MIN_TEXTS:
        bar = _tqdm_class()(total=len(texts), desc=desc, unit="chunk", leave=False)
    out: list[T] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            out.append(convert(embeddings.embed_documents(batch), len(batch)))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return out
