"""The package's shape: a light import, a complete facade, typed, documented."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import chatkit

HEAVY = ("torch", "gradio", "faiss", "sentence_transformers", "transformers")


@pytest.mark.parametrize(
    "use",
    [
        "chatkit.KeyedLock(); chatkit.Timeline()",
        # naming the lazy classes imports their modules, but not the heavy libraries behind them
        "chatkit.CowVectorStore, chatkit.SessionManager, chatkit.ExtractiveChatModel, chatkit.HashEmbeddings",
    ],
    ids=["import", "lazy names"],
)
def test_import_chatkit_is_light(use: str) -> None:
    code = f"import sys, chatkit\n{use}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{use!r} loaded {out.stdout.strip()}"


@pytest.mark.parametrize("name", chatkit.__all__)
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    obj = getattr(chatkit, name)
    doc = inspect.getdoc(obj)
    assert doc, f"chatkit.{name} has no docstring"
    if inspect.isclass(obj) and not issubclass(obj, BaseException) and not _is_plain_record(obj):
        assert ">>>" in doc, f"chatkit.{name}'s docstring has no runnable example"


def _is_plain_record(cls: type) -> bool:
    """Frozen result/statistics records are documented by their fields, not by an example."""
    import dataclasses

    return dataclasses.is_dataclass(cls)


def test_unknown_attribute_is_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        chatkit.Nope  # noqa: B018


def test_py_typed_is_shipped() -> None:
    assert (Path(chatkit.__file__).parent / "py.typed").is_file()


def test_library_never_prints() -> None:
    root = Path(chatkit.__file__).parent
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.lstrip().startswith("print(")
    ]
    assert offenders == []


def test_no_pickle_in_library() -> None:
    root = Path(chatkit.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if "import pickle" in p.read_text()]
    assert offenders == []


def test_submodules_import_cleanly() -> None:
    root = Path(chatkit.__file__).parent
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        name = ".".join(("chatkit", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        importlib.import_module(name)
