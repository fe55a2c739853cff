"""Checks of what callers hand to :class:`~chatkit.SessionManager`: messages, session ids, run configs.

Each check raises before anything changes, with an exception that names the offending value.
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig

from ..errors import SessionNotFound

__all__ = ["check_message", "check_session_id", "check_config", "positive_int", "SESSION_ID"]

# Session ids: what create_session() makes (22 url-safe characters), or a caller's own id with
# create_if_missing=True (letters, digits and ``_ - . : @``, at most 128 characters).
SESSION_ID = re.compile(r"[A-Za-z0-9_\-.:@]{1,128}")

# Refused in messages: C0 controls other than tab, newline and carriage return (NUL; ESC, which starts
# ANSI escape sequences), DEL, C1 controls (U+009B is the one-character CSI), and lone surrogates, which
# no UTF-8 serialiser accepts.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMES = {"\x00": "NUL", "\x1b": "ESC, which starts ANSI escape sequences", "\x9b": "CSI, an ANSI escape"}

# RunnableConfig keys a caller may pass to a turn; ``configurable`` may not name the thread.
_CONFIG_KEYS = frozenset(
    {"callbacks", "tags", "metadata", "run_name", "run_id", "recursion_limit", "max_concurrency", "configurable"}
)
_RESERVED_CONFIGURABLE = ("thread_id", "checkpoint_id", "checkpoint_ns", "checkpoint_map")


def check_message(message: object, limit: int) -> str:
    """``message`` if it is a str of 1 to ``limit`` characters, not only whitespace, without control
    characters or lone surrogates.

    Example:
        >>> check_message("hello", 10)
        'hello'
        >>> check_message("red \\x1b[31m", 20)
        Traceback (most recent call last):
        ...
        ValueError: message contains U+001B (ESC, which starts ANSI escape sequences) at position 4; control characters and lone surrogates are refused, nothing was saved

    Raises:
        TypeError: not a str.
        ValueError: empty, only whitespace, longer than ``limit``, or with a forbidden character.
    """
    if not isinstance(message, str):
        raise TypeError(
            f"message must be a str of 1 to {limit} characters (max_message_chars={limit}), "
            f"got {type(message).__name__} {message!r:.60}"
        )
    if not message.strip():
        raise ValueError(
            f"message is empty or only whitespace; send 1 to {limit} characters (max_message_chars={limit})"
        )
    if len(message) > limit:
        raise ValueError(f"message is {len(message)} characters long, over the limit of max_message_chars={limit}")
    bad = _FORBIDDEN.search(message)
    if bad is not None:
        char = bad.group()
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            name = "a lone surrogate"
        else:
            name = _NAMES.get(char) or unicodedata.name(char, "a control character")
        raise ValueError(
            f"message contains U+{code:04X} ({name}) at position {bad.start()}; control characters and "
            "lone surrogates are refused, nothing was saved"
        )
    return message


def check_session_id(session_id: object) -> str:
    """``session_id`` if it is well formed (see :data:`SESSION_ID`).

    Raises:
        TypeError: a coroutine (``create_session()`` without ``await``).
        SessionNotFound: a malformed id (no session can have it).
    """
    if inspect.iscoroutine(session_id):
        session_id.close()
        raise TypeError(f"session_id is a coroutine ({session_id!r:.60}); did you forget to await create_session()?")
    if not isinstance(session_id, str) or SESSION_ID.fullmatch(session_id) is None:
        raise SessionNotFound(session_id)
    return session_id


def check_config(config: object) -> RunnableConfig:
    """A caller's ``RunnableConfig`` for a turn (callbacks, tags, metadata, recursion_limit, ...).

    Example:
        >>> check_config({"tags": ["web"], "recursion_limit": 10})
        {'tags': ['web'], 'recursion_limit': 10}
        >>> check_config({"configurable": {"thread_id": "x"}})
        Traceback (most recent call last):
        ...
        ValueError: config['configurable']['thread_id'] is set by SessionManager (the session is the thread); remove it

    Raises:
        TypeError: not a mapping, or a ``configurable`` that is not one.
        ValueError: an unknown key, or a ``configurable`` that names the thread or a checkpoint.
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a RunnableConfig (a dict) or None, got {config!r:.80}")
    unknown = sorted(str(k) for k in config if k not in _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}")
    configurable = config.get("configurable")
    if configurable is not None:
        if not isinstance(configurable, Mapping):
            raise TypeError(f"config['configurable'] must be a dict, got {configurable!r:.80}")
        for key in configurable:
            if key in _RESERVED_CONFIGURABLE or str(key).startswith("__"):
                raise ValueError(
                    f"config['configurable'][{key!r}] is set by SessionManager (the session is the thread); remove it"
                )
    return dict(config)  # type: ignore[return-value]


def positive_int(name: str, value: Any, *, allow_none: bool) -> int | None:
    """``value`` if it is an int >= 1 (or ``None`` when allowed).

    Raises:
        TypeError: not an int.
        ValueError: below 1.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return value
