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
ALLOWED_SUFFIXES: tuple[str, ...] = (".md", ".txt")
MAX_FILES_PER_UPLOAD = 20
EmbeddingsChoice = Literal["minilm", "hash"]

# What each double-texting policy does to the answer being written, to the messages already waiting, and
# to the new message (the manager's semantics: see chatkit.SessionManager). A list, not a table: it reads
# on a phone.
POLICY_SUMMARY = """- **enqueue**: the answer being written finishes; the messages waiting keep their place; the new
  message waits its turn, and its answer sees every earlier message.
- **reject**: the answer being written finishes; the messages waiting keep their place; the new message
  is refused at once (`SessionBusy`) and nothing of it is stored.
- **interrupt**: the answer being written is cancelled (its message stays, without a reply); the
  messages waiting are dropped, nothing of them stored; the new message is answered next and sees the
  interrupted one.
- **rollback**: the answer being written is cancelled and discarded entirely; the messages waiting are
  dropped; the new message is answered next, as if the others had never been sent."""

POLICY_HELP: dict[str, str] = {
    "enqueue": "**enqueue** (default): messages wait in line and are answered one by one, in order; "
    "each answer sees every earlier message.",
    "reject": "**reject**: while a message is being answered or waits, new ones are refused at once "
    "(`SessionBusy`); nothing is stored for them.",
    "interrupt": "**interrupt**: a new message cancels the answer in progress and drops the messages still "
    "waiting; the interrupted message stays in the history (without a reply) and the new answer sees it.",
    "rollback": "**rollback**: a new message cancels the answer in progress, discards that turn entirely "
    "and drops the messages still waiting; only the newest message is answered.",
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
        latency: seconds the extractive model "thinks" before a reply (0 = as fast as possible).
        token_delay: seconds between the words of a streamed extractive reply (so it visibly streams).
        burst_latency: seconds per reply for the double-texting control, so that its messages overlap.
        max_message_chars: longest accepted chat message.
        max_upload_bytes: largest accepted knowledge-base file.
        max_burst: most messages the double-texting control sends at once.
        max_turns: most messages one conversation accepts (then the visitor starts a new one): with
            ``max_message_chars`` it bounds a session's memory.
        session_ttl: seconds of inactivity after which a conversation expires (its checkpoints are
            deleted and its browser bindings forgotten).
        max_sessions: most conversations kept at once; beyond it the least recently used idle ones expire.
        max_documents: most documents in the shared knowledge base.
        sweep_interval: seconds between two expiry sweeps of the background maintenance.
        admins: login names (``--auth``) that may remove or replace anyone's document.
        secret_key: the key that signs the tokens browsers keep (``None``: a random one per start, so a
            restart forgets them); never shown in ``repr``.

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
    token_delay: float = 0.03
    burst_latency: float = 0.6
    max_message_chars: int = 2000
    max_upload_bytes: int = 512 * 1024
    max_burst: int = 5
    max_turns: int = 50
    session_ttl: float = 30 * 60.0
    max_sessions: int = 1000
    max_documents: int = 200
    sweep_interval: float = 60.0
    admins: frozenset[str] = frozenset()
    secret_key: bytes | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.embeddings not in ("minilm", "hash"):
            raise ValueError(f"embeddings must be 'minilm' or 'hash', got {self.embeddings!r}")
        for name in ("latency", "token_delay", "burst_latency"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        for name in ("session_ttl", "sweep_interval"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        for name in ("max_message_chars", "max_upload_bytes", "max_burst", "max_turns", "max_sessions", "max_documents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.admins, frozenset):
            object.__setattr__(self, "admins", frozenset(self.admins))
        if self.secret_key is not None and len(self.secret_key) < 16:
            raise ValueError(f"secret_key must have at least 16 bytes, got {len(self.secret_key)}")

    @classmethod
    def from_env(cls) -> DemoConfig:
        """Defaults, overridden by ``CHATKIT_DEMO_EMBEDDINGS``, ``CHATKIT_DEMO_DATA`` (``-``: none),
        ``CHATKIT_DEMO_LATENCY`` and ``CHATKIT_DEMO_SECRET`` (the token key, 16 characters or more) (used by the
        module-level ``demo``, by tests, and as the command line's defaults).

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
        if secret := os.environ.get("CHATKIT_DEMO_SECRET"):
            kwargs["secret_key"] = secret.encode()
        return cls(**kwargs)
