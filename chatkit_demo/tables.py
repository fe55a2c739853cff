"""Tables for the page as plain HTML: :func:`html_table` (readable at 390 px as at 1280 px).

Gradio's ``Dataframe`` keeps a minimum width per column and scrolls inside its box, so on a phone its
right-hand columns (and their headers) end up out of sight. These tables wrap their cells instead, and
below 640 px each row becomes a small card whose cells carry their column's name (CSS in :data:`CSS`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

CSS = """
.ck-table { width: 100%; border-collapse: collapse; table-layout: fixed; font-size: var(--text-md); }
.ck-table th, .ck-table td { text-align: left; vertical-align: top; padding: 6px 8px;
  border-bottom: 1px solid var(--border-color-primary); overflow-wrap: break-word; word-break: normal;
  hyphens: none; }
.ck-table th { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.ck-table td.ck-num { white-space: nowrap; }
.ck-table td code { white-space: normal; overflow-wrap: anywhere; }
.ck-empty { color: var(--body-text-color-subdued); font-style: italic; margin: 4px 0; }
.ck-scroll { overflow-y: auto; overscroll-behavior: contain; }
@media (max-width: 640px) {
  .ck-table { font-size: var(--text-sm); }
  .ck-table th, .ck-table td { padding: 4px 4px; }
  .ck-stack, .ck-stack tbody, .ck-stack tr, .ck-stack td { display: block; width: 100% !important; border: none; }
  .ck-stack colgroup, .ck-stack thead { display: none; }
  .ck-stack tr { border: 1px solid var(--border-color-primary); border-radius: 8px; margin-bottom: 8px; padding: 4px 0; }
  .ck-stack td { padding: 2px 10px; }
  .ck-stack td::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""


def html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    widths: Sequence[str] | None = None,
    empty: str = "Nothing to show yet.",
    numeric: Sequence[int] = (),
    stack: bool = False,
    max_height: int | None = None,
) -> str:
    """An HTML table of ``rows`` under ``headers`` (every value escaped), or the ``empty`` line.

    Args:
        headers: the column names (also each cell's label on a phone).
        rows: the cells, one sequence per row.
        widths: CSS widths of the columns on wide screens (e.g. ``["50%", "30%", "20%"]``).
        empty: shown (in italics) instead of a table without rows.
        numeric: indices of short numeric columns, which never wrap.
        stack: below 640 px, show each row as a card of labelled cells (for tables of long texts).
        max_height: scroll inside a box this many pixels tall (long lists).

    Example:
        >>> print(html_table(["name", "n"], [["a<b", 1]], numeric=[1]))
        <table class="ck-table"><thead><tr><th>name</th><th>n</th></tr></thead><tbody><tr><td data-label="name">a&lt;b</td><td data-label="n" class="ck-num">1</td></tr></tbody></table>
        >>> html_table(["name"], [], empty="No documents.")
        '<p class="ck-empty">No documents.</p>'
    """
    if not rows:
        return f'<p class="ck-empty">{html.escape(empty)}</p>'
    cols = ""
    if widths:
        cols = "<colgroup>" + "".join(f'<col style="width: {html.escape(w)}">' for w in widths) + "</colgroup>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, (header, value) in enumerate(zip(headers, row, strict=False)):
            cls = ' class="ck-num"' if i in numeric else ""
            cells.append(f'<td data-label="{html.escape(header)}"{cls}>{html.escape(str(value))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    classes = "ck-table ck-stack" if stack else "ck-table"
    table = f'<table class="{classes}">{cols}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    if max_height is not None:
        table = f'<div class="ck-scroll" style="max-height: {int(max_height)}px">{table}</div>'
    return table
