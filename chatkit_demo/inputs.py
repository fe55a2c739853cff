"""Checks on what visitors send: chat messages and knowledge-base uploads."""

from __future__ import annotations

from pathlib import Path

from .config import ALLOWED_SUFFIXES


# ------------------------------------------------------------------------------------ input checks
class UploadRejected(ValueError):
    """A knowledge-base upload that can't be indexed; the message says why, for the UI."""


def validate_message(message: object, *, max_chars: int) -> str:
    """Return the message stripped, or raise ``ValueError`` with a sentence a person understands.

    >>> validate_message("  hi ", max_chars=10)
    'hi'
    >>> validate_message("   ", max_chars=10)
    Traceback (most recent call last):
    ...
    ValueError: The message is empty: type something first.
    """
    if not isinstance(message, str):
        raise ValueError(f"The message must be text, got {type(message).__name__}.")
    text = message.strip()
    if not text:
        raise ValueError("The message is empty: type something first.")
    if len(text) > max_chars:
        raise ValueError(
            f"The message is too long: {len(text):,} characters, the limit is {max_chars:,}. "
            "Shorten it and send it again."
        )
    return text


def read_upload(path: str | Path, *, max_bytes: int) -> tuple[str, str]:
    """Read one uploaded knowledge-base file: returns ``(source name, text)``.

    Raises:
        UploadRejected: wrong type (not ``.md``/``.txt``), larger than ``max_bytes``, empty, or not UTF-8.
    """
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in ALLOWED_SUFFIXES:
        raise UploadRejected(
            f"{name}: only .md and .txt files can be added (got {path.suffix or 'no extension'!r})."
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadRejected(f"{name}: the file is {size:,} bytes; the limit is {max_bytes:,} bytes.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UploadRejected(
            f"{name}: the file is not valid UTF-8 text (byte {exc.start}); save it as UTF-8 and retry."
        ) from None
    if not text.strip():
        raise UploadRejected(f"{name}: the file is empty.")
    if "\x00" in text:
        raise UploadRejected(f"{name}: the file contains NUL bytes; it does not look like text.")
    return name, text
