"""LangChain's standard VectorStore suite (langchain-tests), run against CowVectorStore."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from chatkit import CowVectorStore, HashEmbeddings


class TestCowVectorStoreStandard(VectorStoreIntegrationTests):
    """Every standard test, sync and async, on a small deterministic embedding."""

    @pytest.fixture
    def vectorstore(self) -> Iterator[VectorStore]:
        store = CowVectorStore(HashEmbeddings(dim=32), compaction="inline", progress=False)
        yield store
        store.delete()  # leave nothing behind, as the suite asks
        store.close()
