"""Metadata filters: LangChain's operators, applied before the scan, identical to the reference semantics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatkit import CowVectorStore, HashEmbeddings
from chatkit.store import filters as filters_module
from chatkit.store.filters import compile_filter, matches

from ._store_helpers import make, paragraphs


def ids(docs: list[Any]) -> list[str]:
    return sorted(d.id for d in docs)


@pytest.fixture
def store() -> CowVectorStore:
    s = make()
    rows = [
        ("a", {"lang": "en", "year": 2019, "score": 0.5, "tags": ["x"]}),
        ("b", {"lang": "en", "year": 2021, "score": 2}),
        ("c", {"lang": "fr", "year": 2023}),
        ("d", {"lang": "de", "year": "2020"}),  # a str year: never in a numeric range
        ("e", {"year": None}),
        ("f", {}),
    ]
    s.add_texts([f"text {n}" for n, _ in rows], [md for _, md in rows], ids=[n for n, _ in rows])
    return s


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({}, ["a", "b", "c", "d", "e", "f"]),
        ({"lang": "en"}, ["a", "b"]),
        ({"lang": {"$eq": "en"}}, ["a", "b"]),
        ({"lang": {"$ne": "en"}}, ["c", "d", "e", "f"]),  # a missing key reads as None: not "en"
        ({"lang": {"$in": ["fr", "de"]}}, ["c", "d"]),
        ({"lang": {"$nin": ["fr", "de"]}}, ["a", "b", "e", "f"]),
        ({"year": {"$gt": 2019}}, ["b", "c"]),
        ({"year": {"$gte": 2019, "$lt": 2023}}, ["a", "b"]),
        ({"year": {"$lte": 2021}}, ["a", "b"]),
        ({"year": {"$gt": "2019"}}, ["d"]),  # strings compare with strings only
        ({"year": None}, ["e", "f"]),
        ({"score": 2.0}, ["b"]),  # Python equality: 2 == 2.0
        ({"tags": ["x"]}, ["a"]),  # an unhashable value compares too
        ({"tags": {"$in": [["x"], "y"]}}, ["a"]),
        ({"$or": [{"lang": "fr"}, {"year": {"$lt": 2020}}]}, ["a", "c"]),
        ({"$and": [{"lang": "en"}, {"year": {"$gt": 2020}}]}, ["b"]),
        ({"lang": "en", "year": 2019}, ["a"]),
        ({"$or": [{"$and": [{"lang": "en"}, {"score": {"$gte": 1}}]}, {"lang": "de"}]}, ["b", "d"]),
        ({"nothing": "here"}, []),
    ],
)
def test_operators_select_what_the_reference_semantics_selects(store: CowVectorStore, flt: dict[str, Any], expected: list[str]) -> None:
    got = store.similarity_search("text", k=10, filter=flt)
    assert ids(got) == expected
    docs = store.snapshot().documents()
    assert sorted(d.id for d in docs if matches(flt, d.metadata)) == expected  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("flt", "error", "fragment"),
    [
        ({"lang": {"$regex": "e."}}, ValueError, r"unknown operator '\$regex' for field 'lang'"),
        ({"$not": {"lang": "en"}}, ValueError, r"unknown operator '\$not' at the top level"),
        ({"lang": {"en": 1}}, ValueError, r"unknown operator 'en'.*\$eq"),
        ({"lang": {}}, ValueError, "empty operator dict"),
        ({"$or": []}, ValueError, "non-empty list"),
        ({"$and": [1]}, TypeError, r"\$and\[0\] must be a dict"),
        ({"lang": {"$in": "en"}}, TypeError, r"\$in for field 'lang' needs a list"),
        ({"year": {"$gt": [1]}}, TypeError, r"\$gt for field 'year' needs a number or a str"),
        ({"year": {"$gt": True}}, TypeError, "needs a number or a str"),
        ({1: "x"}, TypeError, "keys must be str"),
        (42, TypeError, "filter must be a dict"),
    ],
)
async def test_bad_filters_raise_naming_the_problem(store: CowVectorStore, flt: Any, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        store.similarity_search("text", filter=flt)
    with pytest.raises(error, match=fragment):
        await store.asimilarity_search("text", filter=flt)
    with pytest.raises(error, match=fragment):
        make().similarity_search("text", filter=flt)  # an empty store checks the filter too


def test_callable_filters_keep_working_and_cannot_change_the_store(store: CowVectorStore) -> None:
    def sneaky(md: dict[str, Any]) -> bool:
        md["lang"] = "changed"
        md.get("tags", []).append("y")
        return md.get("year") == 2021

    assert ids(store.similarity_search("text", k=1, filter=sneaky)) == ["b"]
    assert ids(store.similarity_search("text", k=10, filter=lambda md: "lang" not in md)) == ["e", "f"]
    assert store.get_by_ids(["a"])[0].metadata == {"lang": "en", "year": 2019, "score": 0.5, "tags": ["x"]}


async def test_stamped_keys_filter_chunks_of_sources_and_tombstones_are_respected() -> None:
    s = make()
    await s.aadd_sources({f"s{i}": paragraphs(f"w{i}a", f"w{i}b") for i in range(6)})
    got = s.similarity_search("w", k=20, filter={"source": {"$in": ["s1", "s3"]}, "chunk": 1})
    assert sorted(d.metadata["source"] for d in got) == ["s1", "s3"]
    await s.aadd_document("s1", paragraphs("new"))  # s1's old rows become tombstones
    got = s.similarity_search("w", k=20, filter={"source": "s1"})
    assert [(d.page_content.split()[0], d.metadata["version"]) for d in got] == [("new", 2)]
    assert s.similarity_search("w", k=20, filter={"version": {"$gte": 2}}) == got
    mmr = s.max_marginal_relevance_search("w", k=2, fetch_k=10, filter={"source": {"$in": ["s2", "s4"]}})
    assert {d.metadata["source"] for d in mmr} <= {"s2", "s4"} and len(mmr) == 2


def test_a_selective_filter_scores_only_matching_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: a filter was applied after the search, with a growing k and a deep copy of every
    candidate's metadata (4.7 s for a filter matching one row of 100k). Now the field index turns it into
    a row mask first: once the field is indexed, no Python work is done per row that does not match."""
    s = make(embeddings=HashEmbeddings(dim=32))
    n = 3000
    s.add_texts([f"t{i}" for i in range(n)], [{"n": i, "even": i % 2 == 0} for i in range(n)])
    s.similarity_search("t", k=1, filter={"n": 0})  # builds the index of field "n" (once per segment)
    made = 0
    real = type(s.snapshot())._document

    def counting(self: Any, seg: Any, row: int) -> Any:
        nonlocal made
        made += 1
        return real(self, seg, row)

    monkeypatch.setattr(type(s.snapshot()), "_document", counting)
    got = s.similarity_search("t", k=4, filter={"n": 1234})
    assert [d.metadata["n"] for d in got] == [1234] and made == 1
    made = 0
    got = s.similarity_search("t", k=4, filter={"even": True})  # broad: half the rows
    assert len(got) == 4 and all(d.metadata["even"] for d in got) and made == 4


@pytest.mark.parametrize(
    ("count", "far"),
    [(1, False), (12, False), (100, False), (250, False), (1500, False), (3000, False), (600, True)],
    ids=["direct-1", "direct-12", "selector-100", "selector-250", "broad-1500", "broad-all", "broad-fallback"],
)
def test_every_search_strategy_finds_the_true_top_k(count: int, far: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct scoring (few rows), the faiss selector (some) and the over-fetching plain search (many; with
    its fallback when the rows that pass are all far from the query) give the exact answer."""
    import chatkit.store.segments as segments

    monkeypatch.setattr(segments, "DIRECT_ROWS", 16)  # so that 3,000 rows exercise every strategy
    rng = np.random.default_rng(count)
    n = 3000
    vecs = rng.standard_normal((n, 16)).astype(np.float32)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    q = unit[7]
    table = {f"t{i}": vecs[i].tolist() for i in range(n)}

    class Table(HashEmbeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [table[t] for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return table[text]

    s = CowVectorStore(Table(dim=16), compaction="off", progress=False)
    if far:  # the rows that pass are the least similar to the query
        chosen = set(np.argsort(unit @ q)[:count].tolist())
    else:
        chosen = set(rng.choice(n, size=count, replace=False).tolist())
    s.add_texts([f"t{i}" for i in range(n)], [{"in": i in chosen} for i in range(n)], ids=[str(i) for i in range(n)])
    s.delete([str(i) for i in sorted(chosen)[: count // 3]])  # some rows that pass are tombstones
    live = sorted(chosen)[count // 3 :]
    truth = sorted(live, key=lambda i: (-float(unit[i] @ q), i))[:10]
    got = s.similarity_search("t7", k=10, filter={"in": True})
    assert [int(d.id) for d in got] == truth  # type: ignore[arg-type]


def test_merged_segments_keep_the_fields_their_inputs_had_indexed() -> None:
    s = make()
    for i in range(4):
        s.add_texts([f"t{i}"], [{"k": i}])
    s.similarity_search("t", filter={"k": 1})
    s.compact()
    (seg,) = s.snapshot().segments
    assert seg.fields().indexed() == ("k",)  # built by the merge, in its thread, not by the next reader


# ---------------------------------------------------------------------- the index agrees with the reference

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from(["a", "b", "c"]),
    st.lists(st.integers(0, 2), max_size=2),
)
metadata = st.dictionaries(st.sampled_from(["x", "y"]), values, max_size=2)
operand = st.one_of(st.none(), st.integers(-3, 3), st.floats(-3, 3, allow_nan=False), st.sampled_from(["a", "b", "c"]))
ranged = st.one_of(st.integers(-3, 3), st.floats(-3, 3, allow_nan=False), st.sampled_from(["a", "b", "c"]))
field = st.one_of(
    operand,
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["$eq", "$ne"]), operand, min_size=1, max_size=1),
    st.dictionaries(st.sampled_from(["$in", "$nin"]), st.lists(st.one_of(operand, st.lists(st.integers(0, 2))), max_size=3), min_size=1, max_size=1),
    st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ranged, min_size=1, max_size=2),
)
leaf = st.dictionaries(st.sampled_from(["x", "y"]), field, min_size=1, max_size=2)
filters = st.recursive(leaf, lambda inner: st.dictionaries(st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3), min_size=1, max_size=1), max_leaves=5)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(rows=st.lists(metadata, min_size=1, max_size=12), flt=filters)
def test_the_segment_index_selects_exactly_the_rows_the_reference_semantics_selects(rows: list[dict[str, Any]], flt: dict[str, Any]) -> None:
    s = make()
    s.add_texts([f"r{i}" for i in range(len(rows))], rows, ids=[str(i) for i in range(len(rows))])
    (seg,) = s.snapshot().segments
    compiled = compile_filter(flt)
    assert isinstance(compiled, filters_module.FieldFilter)
    mask = compiled.mask(seg.fields())
    assert np.flatnonzero(mask).tolist() == [i for i, md in enumerate(rows) if matches(flt, md)]
