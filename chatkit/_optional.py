"""Optional dependencies: every import of one goes through :func:`optional_import`, which names the extra.

``pip install chatkit`` installs the core: the lock, the sessions, the store over any LangChain
``Embeddings``, timelines' data. Heavier features come with an extra (see ``EXTRAS``); using one without
it raises ``ModuleNotFoundError`` (an ``ImportError``) that says what to install, e.g.
``pip install "chatkit[local]"``, instead of a bare "No module named 'torch'".

Call it where the package is first needed (inside the function, so ``import chatkit`` stays light), or at
the top of a module that only works with the extra::

    torch = optional_import("torch", extra="local", feature="default_embeddings()")
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "optional_import"]

# extra -> what it adds (the optional-dependencies of pyproject.toml; tests/test_packaging.py checks both agree)
EXTRAS: dict[str, str] = {
    "local": "the local embedding model and local Hugging Face chat models (torch CPU, sentence-transformers)",
    "viz": "timeline and experiment charts (matplotlib, plotly)",
    "demo": "the Gradio demo, chatkit-demo (includes local and viz)",
    "distributed": "locks and sessions across processes and hosts (Redis, PostgreSQL)",
    "sqlite": "sessions that survive a restart in a SQLite file (LangGraph's SQLite checkpointer)",
}


def optional_import(name: str, *, extra: str, feature: str | None = None) -> ModuleType:
    """Import the module ``name``, or raise an error that says which chatkit extra installs it.

    Args:
        name: the module to import, e.g. ``"matplotlib.figure"``.
        extra: the extra of chatkit that provides it, one of :data:`EXTRAS`.
        feature: what needs it, for the message (default: ``name``).

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: ``name``, or a package it imports, is not installed; the message names the
            missing module and the ``pip install "chatkit[extra]"`` command, and ``.name`` is the missing
            module. A missing module of chatkit itself is re-raised unchanged (that is a bug, not an extra).
        ValueError: ``extra`` is not one of :data:`EXTRAS`.

    Example:
        >>> optional_import("json", extra="viz").dumps([1])
        '[1]'
        >>> optional_import("no_such_module", extra="viz", feature="Timeline.plot()")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ModuleNotFoundError: Timeline.plot() needs 'no_such_module', which is not installed: pip install "chatkit[viz]" ...
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown chatkit extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        if missing.split(".")[0] in ("chatkit", "chatkit_demo"):
            raise
        raise ModuleNotFoundError(
            f"{feature or name} needs {missing!r}, which is not installed: "
            f'pip install "chatkit[{extra}]" ({EXTRAS[extra]})',
            name=missing,
        ) from exc
