"""The Knowledge base and Race lab handlers called directly, and the services' start-up (no server).

The knowledge base is shared: who added what (and when, and in which version) is shown to everyone, a
visitor may change only their own documents (an admin any), the bundled ones come back with one click,
and every visitor's table follows the others' changes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import gradio as gr
import pytest

import demo_app
from chatkit import HashEmbeddings
from chatkit_demo.ui import _status_view
from demo_app import DemoHandlers, DemoServices, KnowledgeHandlers, RaceLabHandlers
from tests.test_demo_harness import fast_config, small_kb


@pytest.fixture
def services(tmp_path: Path) -> DemoServices:
    return DemoServices(fast_config(small_kb(tmp_path / "kb"), admins=frozenset({"teacher"}), max_documents=6))


@pytest.fixture
def kb(services: DemoServices) -> KnowledgeHandlers:
    return KnowledgeHandlers(services)


def tab(name: str, user: str | None = None) -> gr.Request:
    return gr.Request(session_hash=f"tab-{name}", username=user)


def doc(tmp_path: Path, name: str, text: str) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def by_name(rows: list[list[object]]) -> dict[str, list[object]]:
    return {str(r[0]): r for r in rows}


PENGUINS = "# Penguins\n\nEmperor penguins huddle together in the antarctic winter.\n"


# ------------------------------------------------------------------------------------ shared, owned
async def test_upload_list_search_remove(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    alice = tab("alice")
    status, table, choices, files, version = await kb.upload([doc(tmp_path, "penguins.md", PENGUINS)], None, alice)
    assert "**added**: `penguins.md`" in status and "penguins.md" in table
    assert files is None  # the upload box is cleared: the next "Add" can't publish the same file again
    rows = by_name(await kb.rows(alice))
    assert set(rows) == {"penguins.md", "lost-updates.md", "snapshots.md", "double-texting.md"}
    assert str(rows["penguins.md"][1]).startswith("you, ") and rows["snapshots.md"][1] == "bundled"
    assert rows["penguins.md"][2] == version > rows["snapshots.md"][2]
    assert choices["choices"] == ["penguins.md"]  # only her own document can be removed
    # and the hint says so (None would leave the "Nothing to remove" shown before her upload)
    assert choices["info"] == "Only the documents you added are listed."

    results, note = await kb.search("emperor penguins in winter", 2)
    assert results.count("<tr>") == 3 and "penguins.md · chunk 0" in results  # header + 2 results
    assert f"snapshot **version {version}**" in note

    status, *_ = await kb.upload([doc(tmp_path, "penguins.md", "# Penguins\n\nPenguins cannot fly.\n")], None, alice)
    assert "**replaced**: `penguins.md`" in status
    status, table, choices, _ = await kb.remove("penguins.md", None, alice)
    assert "Removed" in status and "penguins.md" not in table and choices["choices"] == []
    status, *_ = await kb.remove("penguins.md", None, alice)
    assert "is not in the knowledge base" in status


async def test_a_visitor_can_change_only_what_they_added(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    """Before: one visitor replaced and then removed another's upload and a bundled document."""
    alice, bob = tab("alice"), tab("bob")
    await kb.upload([doc(tmp_path, "penguins.md", PENGUINS)], None, alice)
    rows = by_name(await kb.rows(bob))
    assert str(rows["penguins.md"][1]).startswith("visitor ")  # bob sees who added it, and when
    _, choices, _ = await kb.documents(None, bob)
    assert choices["choices"] == [] and choices["info"].startswith("Nothing to remove")
    status, *_ = await kb.remove("penguins.md", None, bob)
    assert "you can remove only the documents you added" in status
    status, *_ = await kb.remove("lost-updates.md", None, bob)
    assert "is a bundled document" in status
    status, *_ = await kb.upload([doc(tmp_path / "bob", "penguins.md", "# Mine now")], None, bob)
    assert "**not added**: `penguins.md` is added by visitor" in status and "Rename your file" in status
    status, *_ = await kb.upload([doc(tmp_path / "bob", "snapshots.md", "# Mine now")], None, bob)
    assert "is a bundled document" in status
    assert by_name(await kb.rows(alice))["penguins.md"][1].startswith("you")  # untouched


async def test_the_visitor_keeps_their_documents_across_a_reload(kb: KnowledgeHandlers, services: DemoServices, tmp_path: Path) -> None:
    before = tab("before")
    await kb.upload([doc(tmp_path, "penguins.md", PENGUINS)], None, before)
    saved = services.binder.saved(before)
    services.binder.release(before)
    _, choices, _ = await kb.documents(saved, tab("after"))
    assert choices["choices"] == ["penguins.md"]


async def test_an_admin_may_remove_anything_and_anyone_can_restore_the_bundled_documents(
    kb: KnowledgeHandlers, services: DemoServices, tmp_path: Path
) -> None:
    teacher, student = tab("t", user="teacher"), tab("s", user="student")
    await kb.upload([doc(tmp_path, "penguins.md", PENGUINS)], None, student)
    status, *_ = await kb.remove("lost-updates.md", None, student)
    assert "is a bundled document" in status
    _, choices, _ = await kb.documents(None, teacher)
    assert "Remove a document (admin" in choices["label"] and "lost-updates.md" in choices["choices"]
    status, *_ = await kb.remove("lost-updates.md", None, teacher)
    assert "Removed" in status
    status, *_ = await kb.upload([doc(tmp_path, "snapshots.md", "# Snapshots\n\nReplaced by the teacher.\n")], None, teacher)
    assert "**replaced**: `snapshots.md`" in status
    assert by_name(await kb.rows(teacher))["penguins.md"][1].startswith("student, ")  # login names under --auth
    status, table, *_ = await kb.restore_bundled(None, student)
    assert "Restored** 2 bundled documents (`lost-updates.md`, `snapshots.md`)" in status
    rows = by_name(await kb.rows(student))
    assert rows["lost-updates.md"][1] == rows["snapshots.md"][1] == "bundled" and "penguins.md" in rows
    status, *_ = await kb.restore_bundled(None, student)
    assert status == "All 3 bundled documents are there, unchanged."


async def test_every_visitor_sees_the_others_changes_on_the_next_tick(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    """Before: other visitors' uploads appeared only after a reload."""
    alice, bob = tab("alice"), tab("bob")
    _, _, shown = await kb.documents(None, bob)
    assert await kb.refresh(shown, None, bob) == (gr.skip(), gr.skip(), gr.skip())  # nothing changed: no redraw
    await kb.upload([doc(tmp_path, "penguins.md", PENGUINS)], None, alice)
    table, choices, now = await kb.refresh(shown, None, bob)
    assert "penguins.md" in table and now > shown and choices["choices"] == []
    await kb.remove("penguins.md", None, alice)
    table, _, later = await kb.refresh(now, None, bob)
    assert "penguins.md" not in table and later > now


async def test_removed_documents_are_compacted_away(kb: KnowledgeHandlers, services: DemoServices, tmp_path: Path) -> None:
    """Before: removing documents left their rows (and memory) in the store."""
    alice = tab("alice")
    await kb.upload([doc(tmp_path, f"big-{i}.md", f"# Big {i}\n\n" + "Penguins swim fast. " * 300) for i in range(3)], None, alice)
    rows_with = len(services.store.snapshot())
    for i in range(3):
        await kb.remove(f"big-{i}.md", None, alice)
    stats = services.store.snapshot().statistics()
    assert stats.dead_rows == 0 and stats.chunks < rows_with and stats.segments == 1


async def test_the_knowledge_base_holds_at_most_max_documents(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    files = [doc(tmp_path, f"note-{i}.md", f"# Note {i}\n\nSome text {i}.") for i in range(4)]
    status, *_ = await kb.upload(files, None, tab("alice"))
    assert status.count("**added**") == 3 and "the knowledge base is full (6 documents)" in status


async def test_bad_uploads_are_reported_and_nothing_stored_is_lost(kb: KnowledgeHandlers, tmp_path: Path) -> None:
    before = await kb.rows(tab("a"))
    files = {
        "slides.pdf": b"%PDF",
        "latin1.md": "caf\u00e9".encode("latin-1"),
        "huge.md": b"a" * (kb.services.config.max_upload_bytes + 1),
        "empty.txt": b"   ",
        "lost-updates.md": b"\xff\xfe broken",  # a bad file replacing an existing document must not touch it
    }
    paths = [doc(tmp_path, "good.txt", "Good text about locks.")]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    status, *_ = await kb.upload(paths, None, tab("a"))
    assert status.count("**not added**") == len(files)
    for message in ("only .md and .txt", "not valid UTF-8", "the limit is", "empty"):
        assert message in status
    after = await kb.rows(tab("a"))
    assert {tuple(r) for r in before} <= {tuple(r) for r in after}
    assert {r[0] for r in after} == {r[0] for r in before} | {"good.txt"}


@pytest.mark.parametrize(
    ("files", "error"),
    [(None, "Choose one or more"), ([], "Choose one or more"), (["a.md"] * 21, "at most 20 files at once, not 21")],
)
async def test_upload_without_files(kb: KnowledgeHandlers, files: list[str] | None, error: str) -> None:
    status, table, _, cleared, _ = await kb.upload(files, None, tab("a"))
    assert error in status and ".md" in table and cleared is None
    with pytest.raises(gr.Error, match=error):
        await kb.api_upload(files or [], tab("a"))


@pytest.mark.parametrize(("query", "error"), [("  ", "Type something"), ("q" * 2001, "too long")])
async def test_a_bad_search_clears_the_results_and_says_why(kb: KnowledgeHandlers, query: str, error: str) -> None:
    """Before: an empty search blanked the results and left the old "Answered by snapshot version" line."""
    results, note = await kb.search("lost update", 3)
    assert "version" in note and results
    results, note = await kb.search(query, 3)
    assert results == "" and error in note and "version" not in note
    with pytest.raises(gr.Error, match=error):
        await kb.api_search(query, 3)


async def test_remove_from_an_api_client_that_never_loaded_the_page(kb: KnowledgeHandlers) -> None:
    """Before: "Value: X is not in the list of choices: []" (Gradio's dropdown check)."""
    client = tab("api-client")
    with pytest.raises(gr.Error, match="`nope.md` is not in the knowledge base"):
        await kb.api_remove("nope.md", client)
    with pytest.raises(gr.Error, match="`lost-updates.md` is a bundled document: you can remove only the documents you added"):
        await kb.api_remove("lost-updates.md", client)
    with pytest.raises(gr.Error, match="Choose a document"):
        await kb.api_remove("", client)
    status, *_ = await kb.remove(None, None, client)
    assert "Choose a document" in status


class _GatedEmbeddings(HashEmbeddings):
    """Hash embeddings whose document embedding blocks (in the store's worker thread) until released,
    for texts containing ``GATE``; queries are never blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if any("GATE" in t for t in texts):
            self.entered.set()
            if not self.release.wait(timeout=60):
                raise TimeoutError("the test never released the embedding")
        return super().embed_documents(texts)


async def test_visitors_keep_chatting_and_searching_while_a_document_is_indexed(tmp_path: Path) -> None:
    embeddings = _GatedEmbeddings()
    services = DemoServices(fast_config(small_kb(tmp_path / "kb")), embeddings=embeddings)
    chat, kb = DemoHandlers(services), KnowledgeHandlers(services)
    await services.ready()
    upload = asyncio.create_task(kb.upload([doc(tmp_path, "big.md", "# Big\n\nGATE " + "penguins " * 200)], None, tab("a")))
    try:
        assert await asyncio.to_thread(embeddings.entered.wait, 60)  # indexing is under way
        history, _ = await chat.api_chat("What is a snapshot?", tab("other"))
        assert [m["role"] for m in history] == ["user", "assistant"]
        rows, _ = await kb.api_search("penguins", 3)
        assert not any(str(r[0]).startswith("big.md") for r in rows)  # not published yet: readers see the old version
        assert not upload.done()
    finally:
        embeddings.release.set()
    status, table, *_ = await upload
    assert "**added**: `big.md`" in status and "big.md" in table
    rows, _ = await kb.api_search("penguins", 3)
    assert str(rows[0][0]).startswith("big.md")


# ------------------------------------------------------------------------------------------ start-up
async def test_the_page_shows_a_loading_state_until_the_knowledge_base_is_ready(tmp_path: Path) -> None:
    """Before: the knowledge base loaded before the server listened (38 s before the page answered)."""
    embeddings = _GatedEmbeddings()
    kb_dir = small_kb(tmp_path / "kb")
    (kb_dir / "gate.md").write_text("# Gate\n\nGATE holds the loading until the test says so.\n")
    services = DemoServices(fast_config(kb_dir), embeddings=embeddings)
    try:
        assert services.status().state == "waiting"
        banner, timer = _status_view(services)  # the first page load starts the loading in the background
        assert await asyncio.to_thread(embeddings.entered.wait, 60)
        banner, timer = _status_view(services)
        assert banner["visible"] and "Loading the knowledge base" in banner["value"] and timer.active
        assert services.status().state == "loading"
        embeddings.release.set()
        await services.ready()  # waits for the background loading (its lock works across loops)
        banner, timer = _status_view(services)
        assert not banner["visible"] and not timer.active
        assert services.status().documents == 4
    finally:
        embeddings.release.set()
        await asyncio.to_thread(services.close)


async def test_a_loading_failure_is_shown_on_the_page(tmp_path: Path) -> None:
    class Broken(HashEmbeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise RuntimeError("the disk is on fire")

    services = DemoServices(fast_config(small_kb(tmp_path / "kb")), embeddings=Broken())
    services.start()
    await asyncio.to_thread(services._thread.join, 60)  # type: ignore[union-attr]  # the loading ended (failed)
    banner, timer = _status_view(services)
    assert "could not start" in banner["value"] and "the disk is on fire" in banner["value"] and not timer.active
    await asyncio.to_thread(services.close)


# ------------------------------------------------------------------------------------------ race lab
@pytest.mark.parametrize("experiment", list(demo_app.EXPERIMENTS))
async def test_race_lab_shows_the_race_then_the_fix(services: DemoServices, experiment: str) -> None:
    lab = RaceLabHandlers(services)
    figure, table, summary = await lab.ui_run(experiment, 3, False)
    rows, api_summary = await lab.api_run(experiment, 3, False)
    assert rows and summary.startswith("**") and "anomalies**" in summary
    assert table.count("<tr>") >= 2 and "ck-stack" in table
    assert figure.data and figure.layout.height >= 150 + 48 * 2  # a plotly chart, taller with more lanes
    assert figure.layout.title.text is None  # the summary is the text above it, not a squeezed title
    figure, table, summary = await lab.ui_run(experiment, 3, True)
    assert summary.startswith("**no anomalies**") and "No anomalies" in table
    assert not services.is_ready  # the lab never touches the demo's own sessions or knowledge base


@pytest.mark.parametrize(("experiment", "n", "error"), [("nope", 3, "Unknown experiment"), (None, 1, "between 2 and 20")])
async def test_race_lab_bad_controls(services: DemoServices, experiment: str | None, n: int, error: str) -> None:
    lab = RaceLabHandlers(services)
    with pytest.raises(gr.Error, match=error):
        await lab.api_run(experiment or next(iter(demo_app.EXPERIMENTS)), n, False)
