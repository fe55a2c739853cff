"""Copy the README's notebook pictures out of the notebooks' stored outputs.

A code cell whose metadata has ``"readme_image": "<name>.png"`` provides ``docs/img/<name>.png``: its PNG
output, as committed. Re-execute the notebooks first (``jupyter execute --inplace notebooks/NAME.ipynb``),
then run ``python docs/readme_images.py`` from the repository root. ``tests/test_readme.py`` checks that the
pictures in ``docs/img/`` are the notebooks' outputs (it only reads).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_images(root: Path = ROOT) -> Iterator[tuple[str, bytes, Path]]:
    """``(picture name, PNG bytes, notebook)`` for every tagged cell of the notebooks in ``root/notebooks``."""
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            name = cell.get("metadata", {}).get("readme_image")
            if not name:
                continue
            pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            if len(pngs) != 1:
                raise ValueError(f"{notebook.name}: the cell for {name} has {len(pngs)} PNG outputs, expected 1")
            yield name, base64.b64decode(pngs[0]), notebook


def main() -> int:
    out = ROOT / "docs" / "img"
    for name, png, notebook in readme_images():
        (out / name).write_bytes(png)
        print(f"{notebook.name} -> docs/img/{name} ({len(png) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
