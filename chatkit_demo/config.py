"""The demo's configuration and limits: :class:`DemoConfig` and the constants the other modules share."""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal


def bundled_data_dir() -> Path:
    """The knowledge base that ships with the demo (markdown files about concurrency and retrieval).

    In an installed wheel it is package data, ``chatkit_demo/data`` (found with ``importlib.resources``);
    in a checkout (an editable install, or the tree on ``PYTHONPATH``) it is ``data/`` at the top of the
    repository, next to ``chatkit_demo/``, where the notebooks and users see it.

    Example:
        >>> (bundled_data_dir() / "race-conditions.md").is_file()
        True
    """
    packaged = importlib.resources.files(__package__ or "chatkit_demo") / "data"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "data"


DEFAULT_DATA_DIR = bundled_data_dir()
POLICIES: tuple[str, ...] = ("enqueue", "reject", "interrupt", "rollback")
LOCK_TIMEOUT = 60.0  # seconds a message may wait for the earlier turns of its session
SESSION_TTL = 2 * 3600.0  # idle chat sessions expire after this many seconds...
MAX_SESSIONS = 10_000  # ...or when there are more than this many (least recently used first)
ALLOWED_SUFFIXES: tuple[str, ...] = (".md", ".txt")
MAX_FILES_PER_UPLOAD = 20
EmbeddingsChoice = Literal["minilm", "hash"]

POLICY_HELP: dict[str, str] = {
    "enqueue": "**enqueue** (default): messages wait in line and are answered one by one, in order; "
    "each answer sees every earlier message.",
    "reject": "**reject**: while a message is being answered, new ones are refused at once "
    "(`SessionBusy`); nothing is stored for them.",
    "interrupt": "**interrupt**: a new message cancels the answer in progress; the interrupted "
    "message stays in the history (without a reply) and the new answer sees it.",
    "rollback": "**rollback**: a new message cancels the answer in progress and discards that turn "
    "entirely; only the newest message is answered.",
}

CHAT_LIMIT = 128  # concurrent chat events across all visitors; one session's turns are serialized by chatkit


# --------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, slots=True)
class DemoConfig:
    """Everything the demo needs to start; immutable, shared by all visitors.

    Attributes:
        data_dir: markdown/text files indexed at start-up (``None``: start with an empty knowledge base).
        model_dir: a local Hugging Face causal-LM directory for :func:`chatkit.load_local_chat_model`;
            ``None`` uses the offline :class:`chatkit.ExtractiveChatModel`.
        embeddings: ``"minilm"`` (the local all-MiniLM-L6-v2, the default) or ``"hash"`` (fast,
            deterministic :class:`chatkit.HashEmbeddings`, for tests).
        latency: seconds the extractive model "thinks" per reply (0 = as fast as possible).
        burst_latency: seconds per reply for the double-texting control, so that its messages overlap.
        max_message_chars: longest accepted chat message.
        max_upload_bytes: largest accepted knowledge-base file.
        max_burst: most messages the double-texting control sends at once.

    Example:
        >>> DemoConfig(embeddings="hash").embeddings
        'hash'
        >>> DemoConfig(max_burst=0)
        Traceback (most recent call last):
        ...
        ValueError: max_burst must be >= 1, got 0
    """

    data_dir: Path | None = DEFAULT_DATA_DIR
    model_dir: Path | None = None
    embeddings: EmbeddingsChoice = "minilm"
    latency: float = 0.0
    burst_latency: float = 0.6
    max_message_chars: int = 2000
    max_upload_bytes: int = 512 * 1024
    max_burst: int = 5

    def __post_init__(self) -> None:
        if self.embeddings not in ("minilm", "hash"):
            raise ValueError(f"embeddings must be 'minilm' or 'hash', got {self.embeddings!r}")
        for name in ("latency", "burst_latency"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        for name in ("max_message_chars", "max_upload_bytes", "max_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls) -> DemoConfig:
        """Defaults, overridden by ``CHATKIT_DEMO_EMBEDDINGS``, ``CHATKIT_DEMO_DATA`` (``-``: none) and
        ``CHATKIT_DEMO_LATENCY`` (used by the module-level ``demo``, by tests, and as the command line's defaults).

        Raises:
            ValueError: a value the fields refuse, or a latency that is not a number.
        """
        kwargs: dict[str, Any] = {}
        if emb := os.environ.get("CHATKIT_DEMO_EMBEDDINGS"):
            kwargs["embeddings"] = emb
        if data := os.environ.get("CHATKIT_DEMO_DATA"):
            kwargs["data_dir"] = None if data == "-" else Path(data)
        if latency := os.environ.get("CHATKIT_DEMO_LATENCY"):
            kwargs["latency"] = float(latency)
        return cls(**kwargs)
