"""The file-system steps of saving and loading a store directory, one small function each.

The rest of :mod:`chatkit.store` calls them through this module (``files.write_file(...)``), never by a
name imported from it, so a test can make any step fail, tear or stop the process (crash injection).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

__all__ = ["fsync", "write_file", "replace", "fsync_dir", "remove", "open_regular", "read_fd", "read_regular"]

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync(fd: int) -> None:
    """Flush one open file to the disk."""
    os.fsync(fd)


def write_file(path: Path, data: bytes | memoryview | np.ndarray) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())


def replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically (``dst`` is replaced if it exists)."""
    os.replace(src, dst)


def fsync_dir(directory: Path) -> None:
    """Make the renames and creations in ``directory`` durable."""
    if os.name != "posix":  # pragma: no cover - directories cannot be fsync'ed on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete one file."""
    os.remove(path)


def open_regular(path: Path) -> int:
    """Open ``path`` for reading, refusing anything but a regular file: a descriptor the caller closes.

    The check and the open are one step (``O_NOFOLLOW``), so a file swapped for a link in between is
    refused too; ``O_NONBLOCK`` keeps a FIFO planted under a file's name from blocking the open.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``path`` is a symbolic link or not a regular file (the message names it).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ValueError(
                f"{path} is a symbolic link (to {target!r}); a saved store holds only regular files"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file; a saved store holds only regular files")
    return fd


def read_fd(fd: int) -> bytes:
    """Everything from an open descriptor's current position to the end (the descriptor stays open)."""
    size = os.fstat(fd).st_size
    chunks = []
    while True:
        chunk = os.read(fd, max(size, 1 << 16))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_regular(path: Path) -> bytes:
    """The bytes of ``path``, checked by :func:`open_regular`.

    Raises:
        FileNotFoundError / ValueError: as :func:`open_regular`.
    """
    fd = open_regular(path)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)
