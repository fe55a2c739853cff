"""Throwaway servers for tests and benchmarks: a Redis server and a PostgreSQL cluster on loopback.

Each starts on a free ``127.0.0.1`` port in a temporary directory, answers within a second or two, and
is stopped and removed when its ``with`` block ends. Nothing is left running or on disk.

* :func:`redis_server` runs Debian's ``redis-server`` with no persistence. ``server.restart()`` stops
  it and starts it again on the same port (with an empty dataset), for failure tests.
* :func:`postgres_server` runs ``initdb`` and ``pg_ctl`` from the installed PostgreSQL binaries. The
  server refuses to run as root, so under root the cluster is created and run as the ``postgres`` user
  (``runuser``).

Both raise :class:`ServerUnavailable` (naming what is missing) when the binaries are not installed, so a
test suite can skip with that reason.

Example:
    >>> from chatkit.testing import redis_server
    >>> with redis_server() as server:                      # doctest: +SKIP
    ...     server.url
    'redis://127.0.0.1:41234/0'
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["ServerUnavailable", "RedisServer", "PostgresServer", "redis_server", "postgres_server", "free_port"]

_START_ATTEMPTS = 5  # a free port can be taken by someone else between probing it and binding it


class ServerUnavailable(RuntimeError):
    """The server's binaries are not installed here (the message says which and how to get them)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A running ``redis-server`` on ``127.0.0.1:port`` (see :func:`redis_server`)."""

    port: int
    binary: str
    directory: Path
    process: subprocess.Popen[str] | None = field(default=None, repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs."""
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        """Start the server and return once it accepts connections (it announces that on stdout)."""
        if self.process is not None:
            raise RuntimeError("this redis server is already running")
        proc = subprocess.Popen(
            [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--daemonize", "no",
                "--loglevel", "notice",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the server says something or exits
            seen.append(line)
            if "Ready to accept connections" in line:
                self.process = proc
                # keep draining its output so the pipe never fills up
                self._pump = threading.Thread(
                    target=_drain, args=(proc.stdout,), name=f"redis-server {proc.pid} output", daemon=True
                )
                self._pump.start()
                return
        proc.wait()
        proc.stdout.close()
        raise OSError(f"redis-server on port {self.port} exited ({proc.returncode}): {''.join(seen[-5:]).strip()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); a no-op if it is not running."""
        proc, self.process = self.process, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._pump is not None:
            self._pump.join()  # it ends at the end of the server's output
            self._pump = None
        assert proc.stdout is not None
        proc.stdout.close()

    def restart(self) -> None:
        """Stop and start again on the same port, with an empty dataset."""
        self.stop()
        self.start()


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


def _redis_binary() -> str:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        raise ServerUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")
    return binary


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run a throwaway ``redis-server`` on a free loopback port for the duration of the block.

    Raises:
        ServerUnavailable: ``redis-server`` is not installed.
        OSError: it would not start (after several ports were tried).
    """
    binary = _redis_binary()
    with tempfile.TemporaryDirectory(prefix="chatkit-redis-") as tmp:
        error: OSError | None = None
        for _ in range(_START_ATTEMPTS):
            server = RedisServer(port=free_port(), binary=binary, directory=Path(tmp))
            try:
                server.start()
            except OSError as exc:
                error = exc
                continue
            try:
                yield server
            finally:
                server.stop()
            return
        assert error is not None
        raise error


# ------------------------------------------------------------------------------------------ PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster on ``127.0.0.1:port`` (see :func:`postgres_server`)."""

    port: int
    directory: Path

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication on loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def _postgres_bin() -> Path:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return Path(d)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise ServerUnavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")


def _as_postgres_user() -> list[str]:
    """The command prefix that runs a server binary: ``runuser -u postgres --`` under root, else nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise ServerUnavailable("running as root needs 'runuser' to start PostgreSQL as the postgres user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable("running as root needs a 'postgres' user to start PostgreSQL as") from None
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Create and run a throwaway PostgreSQL cluster on a free loopback port for the duration of the block.

    ``initdb`` takes ~1.5 s; the cluster uses trust authentication on 127.0.0.1 only and a socket
    directory inside its temporary directory.

    Raises:
        ServerUnavailable: the PostgreSQL binaries (or, under root, ``runuser``/the ``postgres`` user) are
            missing.
        OSError: the cluster would not start.
    """
    bindir = _postgres_bin()
    prefix = _as_postgres_user()
    tmp = Path(tempfile.mkdtemp(prefix="chatkit-pg-"))
    try:
        if prefix:
            shutil.chown(tmp, user="postgres")
        data = tmp / "data"
        run = subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise OSError(f"initdb failed: {run.stderr.strip() or run.stdout.strip()}")
        pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
        for attempt in range(_START_ATTEMPTS):
            port = free_port()
            options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            run = subprocess.run(
                [*pg_ctl, "-w", "-t", "60", "-o", options, "-l", str(tmp / "log"), "start"],
                capture_output=True,
                text=True,
            )
            if run.returncode == 0:
                break
            if attempt == _START_ATTEMPTS - 1:
                log = (tmp / "log").read_text(errors="replace")[-2000:] if (tmp / "log").exists() else ""
                raise OSError(f"PostgreSQL would not start: {run.stderr.strip()} {log}")
        try:
            yield PostgresServer(port=port, directory=tmp)
        finally:
            subprocess.run([*pg_ctl, "-w", "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
