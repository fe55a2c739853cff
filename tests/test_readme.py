"""The README's claims that can be checked mechanically: the quick start's output, links to files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else None]


def test_quick_start_prints_what_the_readme_says() -> None:
    section = _section("## Quick start")
    code, expected = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout == expected


def test_linked_files_exist() -> None:
    root = README.parent
    targets = re.findall(r"\]\(((?:docs|notebooks|data)/[^)#]+)\)", README.read_text())
    assert targets, "the README links no pictures or notebooks"
    missing = [t for t in targets if not (root / t).exists()]
    assert missing == []


def test_readme_shows_the_two_commands() -> None:
    setup = _section("## Set up")
    assert "make demo" in setup and "make test" in setup


def test_the_many_processes_worker_runs_as_shown(redis_url: str, postgres_dsn: str, tmp_path: Path) -> None:
    """The README's worker.py, against throwaway servers: set up once, then two workers at once, one message
    each for the same session: turns 1 and 2, one per worker."""
    import os
    import uuid

    section = _section("## Many processes")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    shown = re.findall(r"^'Hello from ([AB])' is turn (\d) of session 'user-42'$", section, flags=re.M)
    assert sorted(shown) == [("A", "2"), ("B", "1")]
    script = tmp_path / "worker.py"
    script.write_text(code)
    env = {**os.environ, "REDIS_URL": redis_url, "POSTGRES_DSN": postgres_dsn}
    subprocess.run([sys.executable, str(script), "setup"], env=env, capture_output=True, text=True, check=True, timeout=120)
    sid = f"user-{uuid.uuid4().hex[:8]}"
    workers = [
        subprocess.Popen([sys.executable, str(script), sid, f"Hello from {who}"], env=env, stdout=subprocess.PIPE, text=True)
        for who in "AB"
    ]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    said = sorted(re.findall(rf"^'Hello from ([AB])' is turn (\d) of session '{sid}'$", "".join(outputs), flags=re.M))
    assert [who for who, _ in said] == ["A", "B"] and sorted(turn for _, turn in said) == ["1", "2"]


def test_readme_pictures_of_the_notebooks_are_their_stored_outputs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_images", README.parent / "docs" / "readme_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pictures = list(module.readme_images(README.parent))
    assert len(pictures) >= 6
    stale = [name for name, png, _ in pictures if (README.parent / "docs" / "img" / name).read_bytes() != png]
    assert stale == [], "run: python docs/readme_images.py"
    text = README.read_text()
    assert all(f"docs/img/{name}" in text for name, _, _ in pictures)
