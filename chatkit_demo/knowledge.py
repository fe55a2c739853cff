"""The Knowledge base tab's handlers: :class:`KnowledgeHandlers` (upload, list, remove, search)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from .config import MAX_FILES_PER_UPLOAD
from .inputs import UploadRejected, read_upload
from .services import DemoServices


class KnowledgeHandlers:
    """Knowledge-base tab: upload (with progress), list, remove, search. Shared by all visitors.

    Uploads are checked before anything is stored: a bad file is reported and skipped, every other file
    of the same upload is indexed, and nothing already stored is touched.
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services

    def __repr__(self) -> str:
        return f"<KnowledgeHandlers {self.services!r}>"

    async def documents(self) -> list[list[Any]]:
        """One row per document: [source, chunks, version it was published in]."""
        await self.services.ready()
        return _document_rows(self.services.store)

    async def upload(
        self, files: Sequence[Any] | None, progress: gr.Progress = gr.Progress()
    ) -> tuple[str, list[list[Any]], Any]:
        """Index uploaded ``.md``/``.txt`` files (replacing same-named documents atomically).

        Returns:
            (a status report in Markdown, the document table, an update of the remove dropdown).
        """
        paths = [getattr(f, "name", f) for f in files or ()]
        if not paths:
            raise gr.Error("Choose one or more .md or .txt files to upload first.")
        if len(paths) > MAX_FILES_PER_UPLOAD:
            raise gr.Error(f"Upload at most {MAX_FILES_PER_UPLOAD} files at once, not {len(paths)}; nothing was added.")
        await self.services.ready()
        store = self.services.store
        lines: list[str] = []
        progress(0.0, desc="checking files")
        checked: list[tuple[str, str]] = []
        for p in paths:
            try:
                checked.append(read_upload(p, max_bytes=self.services.config.max_upload_bytes))
            except (UploadRejected, OSError) as exc:
                lines.append(f"- **not added**: {exc}")
        for i, (name, text) in enumerate(checked):
            progress((i, len(checked)), desc=f"indexing {name}", unit="files")
            try:
                record = await store.aadd_document(name, text)
            except (ValueError, TypeError) as exc:
                lines.append(f"- **not added**: {name}: {exc}")
                continue
            verb = "replaced" if record.replaced else "added"
            plural = "s" if record.chunks != 1 else ""
            lines.append(f"- **{verb}**: `{name}`, {record.chunks} chunk{plural}, published as version {record.version}")
        progress(1.0, desc="done")
        return "\n".join(lines), _document_rows(store), _source_choices(store)

    async def remove(self, source: str | None) -> tuple[str, list[list[Any]], Any]:
        """Remove one document; the table and the dropdown are refreshed."""
        if not source:
            raise gr.Error("Choose a document to remove first.")
        await self.services.ready()
        store = self.services.store
        existed = await store.aremove_document(source)
        status = (
            f"**Removed** `{source}` (now version {store.version})."
            if existed
            else f"`{source}` was not in the knowledge base (someone else may have removed it)."
        )
        return status, _document_rows(store), _source_choices(store)

    async def source_choices(self) -> Any:
        """An update of the remove dropdown with the current documents."""
        await self.services.ready()
        return _source_choices(self.services.store)

    async def search(self, query: str, k: float = 4) -> tuple[list[list[Any]], str]:
        """Search one pinned snapshot; says which version answered.

        Returns:
            (rows [source, chunk, score, text], a Markdown line naming the snapshot version).
        """
        if not isinstance(query, str) or not query.strip():
            raise gr.Error("Type something to search for.")
        if len(query) > self.services.config.max_message_chars:
            raise gr.Error(f"The query is too long; the limit is {self.services.config.max_message_chars:,} characters.")
        await self.services.ready()
        snapshot = self.services.store.snapshot()
        hits = await snapshot.asimilarity_search_with_relevance_scores(query.strip(), k=max(1, int(k)))
        rows = [
            [
                doc.metadata.get("source", "?"),
                doc.metadata.get("chunk", doc.metadata.get("chunk_index", "")),
                round(float(score), 3),
                _preview(doc.page_content),
            ]
            for doc, score in hits
        ]
        note = f"Answered by snapshot **version {snapshot.version}** ({len(rows)} results)."
        return rows, note


def _preview(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _document_rows(store: Any) -> list[list[Any]]:
    """[source, chunks, version] per document, all read from one pinned snapshot."""
    snapshot = store.snapshot()
    rows: list[list[Any]] = []
    for source in snapshot.sources():
        chunks = snapshot.documents(source)
        version = max((int(doc.metadata.get("version", 0)) for doc in chunks), default=0)
        rows.append([source, len(chunks), version])
    return rows


def _source_choices(store: Any) -> Any:
    return gr.update(choices=store.snapshot().sources(), value=None)
