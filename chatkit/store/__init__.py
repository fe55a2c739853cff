"""The copy-on-write vector store (:class:`CowVectorStore`), its records, and the naive baseline."""

from __future__ import annotations

from .directory import SavedVersion
from .naive import NaiveVectorStore
from .records import CompactionResult, DocumentRecord, StoreStatistics
from .snapshot import StoreSnapshot
from .vectorstore import CowVectorStore

__all__ = ["CowVectorStore", "StoreSnapshot", "DocumentRecord", "StoreStatistics", "CompactionResult", "NaiveVectorStore", "SavedVersion"]
