"""The Knowledge base tab's handlers: :class:`KnowledgeHandlers` (upload, list, remove, restore, search).

The knowledge base is shared by every visitor. Each document records who added it and when (its
metadata: ``owner``, a keyed fingerprint of the login name or the browser's visitor id; ``added_by``, the
name others see; ``added_at``), and the version it was published in. A visitor may replace or remove only
the documents they added; an admin (``--admin`` with ``--auth``) any. The bundled documents come back with
one click.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

import chatkit

from .config import MAX_FILES_PER_UPLOAD
from .inputs import UploadRejected, read_upload
from .services import BUNDLED, DemoServices, bundled_metadata, now_iso, trim_memory
from .tables import html_table

logger = logging.getLogger("chatkit.demo")

HEADERS = ["document", "added by", "version"]
HEADER_WIDTHS = ["46%", "34%", "20%"]
RESULT_HEADERS = ["source", "relevance", "text"]
RESULT_WIDTHS = ["28%", "14%", "58%"]


class KnowledgeError(Exception):
    """Something to tell the visitor in plain words about the knowledge base; not a bug."""


@dataclasses.dataclass(frozen=True, slots=True)
class Who:
    """Who is asking: ``owner`` (the fingerprint stored with their documents), ``label`` (the name others
    see), ``admin`` (may remove or replace anyone's document)."""

    owner: str
    label: str
    admin: bool


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentInfo:
    """One document of a snapshot: its name, chunk count, the version it was published in, who added it
    (``owner`` fingerprint and ``added_by`` label) and when (``added_at``, UTC)."""

    source: str
    chunks: int
    version: int
    owner: str
    added_by: str
    added_at: str


def document_infos(snapshot: Any) -> list[DocumentInfo]:
    """Every document of ``snapshot`` (one pinned version), sorted by name."""
    infos: list[DocumentInfo] = []
    for source in snapshot.sources():
        chunks = snapshot.documents(source)
        meta = chunks[0].metadata if chunks else {}
        infos.append(
            DocumentInfo(
                source=source,
                chunks=len(chunks),
                version=max((int(doc.metadata.get("version", 0)) for doc in chunks), default=0),
                owner=str(meta.get("owner", "")),
                added_by=str(meta.get("added_by", "someone")),
                added_at=str(meta.get("added_at", "")),
            )
        )
    return infos


def _when(iso: str) -> str:
    """``2025-01-31T14:05:09Z`` -> ``14:05 UTC`` (the day is left out: the demo lives for a lesson)."""
    return f"{iso[11:16]} UTC" if len(iso) >= 16 else ""


class KnowledgeHandlers:
    """Knowledge-base tab: upload (with progress), list, remove, restore the bundled documents, search.

    Uploads are checked before anything is stored: a bad file is reported and skipped, every other file
    of the same upload is indexed, and nothing already stored is touched. The page's events answer
    problems with a status line (no ``gr.Error``); the ``api_*`` methods raise ``gr.Error``.

    Example:
        >>> import asyncio
        >>> from chatkit_demo.config import DemoConfig
        >>> kb = KnowledgeHandlers(DemoServices(DemoConfig(embeddings="hash", data_dir=None)))
        >>> asyncio.run(kb.search("   ", 3))
        ('', 'Type something to search for.')
    """

    def __init__(self, services: DemoServices) -> None:
        self.services = services
        self._writing = chatkit.KeyedLock()  # per document name: the ownership check and the write together

    def __repr__(self) -> str:
        return f"<KnowledgeHandlers {self.services!r}>"

    # -- who is asking -----------------------------------------------------------------------------
    def who(self, request: gr.Request | None) -> Who:
        """The caller as the knowledge base sees them: their login name under ``--auth``, else their
        browser's visitor id (a new one for a client that never loaded the page)."""
        services = self.services
        username = getattr(request, "username", None)
        if isinstance(username, str) and username:
            owner = services.signer.fingerprint(f"user:{username}")
            return Who(owner=owner, label=username, admin=username in services.config.admins)
        try:
            visitor = services.binder.visitor(request)
        except PermissionError:
            return Who(owner="nobody", label="an API client", admin=False)
        owner = services.signer.fingerprint(f"visitor:{visitor}")
        return Who(owner=owner, label=f"visitor {owner[:4]}", admin=False)

    def _may_change(self, info: DocumentInfo, who: Who) -> bool:
        return who.admin or (info.owner == who.owner and info.owner != BUNDLED)

    # -- views -------------------------------------------------------------------------------------
    def _rows(self, infos: Sequence[DocumentInfo], who: Who) -> list[list[Any]]:
        rows: list[list[Any]] = []
        for info in infos:
            if info.owner == BUNDLED:
                by = "bundled"
            else:
                name = "you" if info.owner == who.owner else info.added_by
                by = f"{name}, {_when(info.added_at)}" if info.added_at else name
            rows.append([info.source, by, info.version])
        return rows

    def _choices(self, infos: Sequence[DocumentInfo], who: Who) -> Any:
        mine = [i.source for i in infos if self._may_change(i, who)]
        label = "Remove a document (admin: any document)" if who.admin else "Remove a document you added"
        if not mine:
            info = "Nothing to remove: you can remove only the documents you added."
        else:  # never None: Gradio reads None as "unchanged" and would keep the line above
            info = "As an admin you may remove any document." if who.admin else "Only the documents you added are listed."
        return gr.update(choices=mine, value=None, label=label, info=info)

    def _view(self, who: Who) -> tuple[str, Any, int]:
        snapshot = self.services.store.snapshot()
        infos = document_infos(snapshot)
        table = html_table(HEADERS, self._rows(infos, who), widths=HEADER_WIDTHS, numeric=[2], max_height=360,
                           empty="The knowledge base is empty: add a document, or restore the bundled ones.")
        return table, self._choices(infos, who), snapshot.version

    async def documents(self, saved: object = None, request: gr.Request | None = None) -> tuple[str, Any, int]:
        """The document table as HTML (``added by`` says "you" for the caller's own), the remove choices
        (only what the caller may remove) and the version shown."""
        if request is not None and getattr(request, "session_hash", None):
            self.services.binder.resolve(saved, request)
        await self.services.ready()
        return self._view(self.who(request))

    async def rows(self, request: gr.Request | None = None) -> list[list[Any]]:
        """The document table's rows ([document, added by, version]) as the caller sees them."""
        await self.services.ready()
        return self._rows(document_infos(self.services.store.snapshot()), self.who(request))

    async def refresh(self, seen: object, saved: object, request: gr.Request) -> tuple[Any, Any, Any]:
        """For the page's timer: the same as :meth:`documents`, or nothing to change if the store's version is
        still ``seen`` (every visitor sees the others' changes within one tick)."""
        services = self.services
        if not services.is_ready or services.store.version == seen:
            return gr.skip(), gr.skip(), gr.skip()
        return await self.documents(saved, request)

    # -- writes -------------------------------------------------------------------------------------
    async def upload(
        self, files: Sequence[Any] | None, saved: object = None, request: gr.Request | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, Any, Any, Any, Any]:
        """Index uploaded ``.md``/``.txt`` files (a same-named document of the caller's is replaced atomically).

        Returns:
            (a status report in Markdown, the document table, the remove choices, ``None`` to clear the
            upload box, the version shown).
        """
        try:
            if request is not None and getattr(request, "session_hash", None):
                self.services.binder.resolve(saved, request)
            status = await self._upload(files, request, progress)
        except KnowledgeError as exc:
            status = str(exc)
        rows, choices, version = await self.documents(saved, request)
        return status, rows, choices, None, version

    async def _upload(self, files: Sequence[Any] | None, request: gr.Request | None, progress: Any = None) -> str:
        paths = [_path_of(f) for f in files or ()]
        if not paths:
            raise KnowledgeError("Choose one or more .md or .txt files to upload first.")
        if len(paths) > MAX_FILES_PER_UPLOAD:
            raise KnowledgeError(f"Upload at most {MAX_FILES_PER_UPLOAD} files at once, not {len(paths)}; nothing was added.")
        await self.services.ready()
        store = self.services.store
        who = self.who(request)
        config = self.services.config
        lines: list[str] = []
        if progress is not None:
            progress(0.0, desc="checking files")
        checked: list[tuple[str, str]] = []
        for p in paths:
            try:
                checked.append(read_upload(p, max_bytes=config.max_upload_bytes))
            except (UploadRejected, OSError) as exc:
                lines.append(f"- **not added**: {exc}")
        for i, (name, text) in enumerate(checked):
            if progress is not None:
                progress((i, len(checked)), desc=f"indexing {name}", unit="files")
            async with self._writing(name):
                infos = {info.source: info for info in document_infos(store.snapshot())}
                existing = infos.get(name)
                if existing is not None and not self._may_change(existing, who):
                    whose = "a bundled document" if existing.owner == BUNDLED else f"added by {existing.added_by}"
                    lines.append(f"- **not added**: `{name}` is {whose}; you can replace only your own documents. "
                                 "Rename your file to add it.")
                    continue
                if existing is None and len(infos) >= config.max_documents:
                    lines.append(f"- **not added**: `{name}`: the knowledge base is full ({config.max_documents} "
                                 "documents); remove one of yours first.")
                    continue
                metadata = {"owner": who.owner, "added_by": who.label, "added_at": now_iso()}
                try:
                    record = await store.aadd_document(name, text, metadata=metadata)
                except (ValueError, TypeError) as exc:
                    lines.append(f"- **not added**: {name}: {exc}")
                    continue
            verb = "replaced" if record.replaced else "added"
            plural = "s" if record.chunks != 1 else ""
            lines.append(f"- **{verb}**: `{name}`, {record.chunks} chunk{plural}, published as version {record.version}")
        if progress is not None:
            progress(1.0, desc="done")
        return "\n".join(lines)

    async def remove(self, source: str | None, saved: object = None, request: gr.Request | None = None) -> tuple[str, Any, Any, Any]:
        """Remove one of the caller's documents (an admin: any); the freed memory is compacted away.

        Returns:
            (a status line, the document table, the remove choices, the version shown).
        """
        try:
            if request is not None and getattr(request, "session_hash", None):
                self.services.binder.resolve(saved, request)
            status = await self._remove(source, request)
        except KnowledgeError as exc:
            status = str(exc)
        rows, choices, version = await self.documents(saved, request)
        return status, rows, choices, version

    async def _remove(self, source: object, request: gr.Request | None) -> str:
        if not isinstance(source, str) or not source:
            raise KnowledgeError("Choose a document to remove first.")
        await self.services.ready()
        store = self.services.store
        who = self.who(request)
        async with self._writing(source):
            info = next((i for i in document_infos(store.snapshot()) if i.source == source), None)
            if info is None:
                raise KnowledgeError(f"`{source[:200]}` is not in the knowledge base (someone may have removed it already).")
            if not self._may_change(info, who):
                whose = "a bundled document" if info.owner == BUNDLED else f"added by {info.added_by}"
                raise KnowledgeError(f"`{source}` is {whose}: you can remove only the documents you added.")
            await store.aremove_document(source)
        await store.acompact()  # drop the removed rows for good, so their memory can be returned
        trim_memory()
        return f"**Removed** `{source}` (now version {store.version})."

    async def restore_bundled(self, saved: object = None, request: gr.Request | None = None) -> tuple[str, Any, Any, Any]:
        """Put back every bundled document that was removed or replaced (anyone may: it only restores them).

        Returns:
            (a status line, the document table, the remove choices, the version shown).
        """
        if request is not None and getattr(request, "session_hash", None):
            self.services.binder.resolve(saved, request)
        status = await self._restore_bundled()
        rows, choices, version = await self.documents(saved, request)
        return status, rows, choices, version

    async def _restore_bundled(self) -> str:
        await self.services.ready()
        bundled = self.services.bundled
        if not bundled:
            return "This demo started without bundled documents: there is nothing to restore."
        store = self.services.store
        current = {i.source: i for i in document_infos(store.snapshot())}
        missing = {name: text for name, text in bundled.items() if current.get(name) is None or current[name].owner != BUNDLED}
        if not missing:
            return f"All {len(bundled)} bundled documents are there, unchanged."
        await store.aadd_sources(missing, metadata={name: bundled_metadata() for name in missing})
        names = ", ".join(f"`{n}`" for n in sorted(missing))
        return f"**Restored** {len(missing)} bundled document{'s' if len(missing) != 1 else ''} ({names}), now version {store.version}."

    # -- search -------------------------------------------------------------------------------------
    async def search(self, query: str, k: float = 4) -> tuple[str, str]:
        """Search one pinned snapshot; says which version answered. A bad query clears the results and says
        why (no results from an earlier search are left next to it).

        Returns:
            (the results as an HTML table [source · chunk, relevance, text], a Markdown line naming the
            snapshot version, or the problem).
        """
        try:
            rows, note = await self._search(query, k)
        except KnowledgeError as exc:
            return "", str(exc)
        return html_table(RESULT_HEADERS, rows, widths=RESULT_WIDTHS, numeric=[1], stack=True, empty="No results."), note

    async def _search(self, query: object, k: float) -> tuple[list[list[Any]], str]:
        if not isinstance(query, str) or not query.strip():
            raise KnowledgeError("Type something to search for.")
        limit = self.services.config.max_message_chars
        if len(query) > limit:
            raise KnowledgeError(f"The query is too long: {len(query):,} characters, the limit is {limit:,}.")
        await self.services.ready()
        snapshot = self.services.store.snapshot()
        hits = await snapshot.asimilarity_search_with_relevance_scores(query.strip(), k=max(1, min(int(k), 20)))
        rows = [
            [
                f"{doc.metadata.get('source', '?')} · chunk {doc.metadata.get('chunk', '?')}",
                round(float(score), 3),
                _preview(doc.page_content),
            ]
            for doc, score in hits
        ]
        note = f"Answered by snapshot **version {snapshot.version}** ({len(rows)} results)."
        return rows, note

    # -- API (gradio_client) --------------------------------------------------------------------------
    async def api_documents(self, request: gr.Request) -> list[list[Any]]:
        """API: the document table's rows [document, added by, version], as the caller sees them."""
        return await self.rows(request)

    async def api_upload(self, files: list[FileData], request: gr.Request) -> tuple[str, list[list[Any]]]:
        """API: upload files (``gradio_client.handle_file``); returns (the status report, the document table)."""
        try:
            status = await self._upload(files, request)
        except KnowledgeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return status, await self.api_documents(request)

    async def api_remove(self, source: str, request: gr.Request) -> tuple[str, list[list[Any]]]:
        """API: remove one of the caller's documents; returns (the status line, the document table)."""
        try:
            status = await self._remove(source, request)
        except KnowledgeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return status, await self.api_documents(request)

    async def api_search(self, query: str, k: int = 4) -> tuple[list[list[Any]], str]:
        """API: :meth:`search`, raising ``gr.Error`` for a bad query."""
        try:
            return await self._search(query, k)
        except KnowledgeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None


def _path_of(file: Any) -> Any:
    """The local path of an uploaded file: a path string, a tempfile-like object, or a FileData (dict)."""
    if isinstance(file, dict):
        return file.get("path")
    return getattr(file, "path", None) or getattr(file, "name", None) or file


def _preview(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
