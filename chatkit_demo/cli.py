"""The command line: :func:`parse_args`, :func:`config_from_args`, :func:`serve` and :func:`main`.

:func:`main` is the ``chatkit-demo`` command (a console script of the package); ``demo_app.py`` in a
checkout uses the same functions. Defaults come from the environment, so that a run without arguments
(``gradio demo_app.py`` on a Gradio whose CLI passes none) can be configured too: ``--host`` and
``--port`` from Gradio's own ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT`` (else 127.0.0.1 and 7860),
``--embeddings``, ``--data`` and ``--latency`` from ``CHATKIT_DEMO_EMBEDDINGS``, ``CHATKIT_DEMO_DATA`` and
``CHATKIT_DEMO_LATENCY``, the token key from ``CHATKIT_DEMO_SECRET`` (see :meth:`DemoConfig.from_env`).
The command line wins.

:func:`serve` checks the port before anything heavy happens, launches the page at once (it shows "loading
the knowledge base" until the background loading is done) and prints one plain line for an expected
problem (a busy port, no share link), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from .config import CHAT_LIMIT, DEFAULT_DATA_DIR, DemoConfig
from .services import DemoServices
from .ui import build_demo, launch_kwargs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``--help`` lists the options).

    Example:
        >>> args = parse_args(["--port", "8000", "--embeddings", "hash"])
        >>> args.port, args.embeddings
        (8000, 'hash')
    """
    parser = argparse.ArgumentParser(description="chatkit's multi-user Gradio demo")
    try:
        env = DemoConfig.from_env()
    except ValueError as exc:  # a bad CHATKIT_DEMO_* value
        parser.error(str(exc))
    defaults = DemoConfig()
    env_host = os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    env_port = os.environ.get("GRADIO_SERVER_PORT") or str(DEFAULT_PORT)
    parser.add_argument("--host", default=env_host,
                        help=f"interface to listen on (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--auth", type=_parse_auth, action="append", default=None, metavar="USER:PASS",
                        help="require a login; repeat for several logins (the login name is part of each binding)")
    parser.add_argument("--admin", action="append", default=None, metavar="USER",
                        help="a login (from --auth) that may remove or replace anyone's knowledge-base document; "
                        "repeatable")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a local Hugging Face causal-LM directory: a real local model "
                        "(default: the offline extractive model, which quotes the knowledge base)")
    parser.add_argument("--data", type=Path, default=env.data_dir, metavar="DIR",
                        help="knowledge-base directory of .md/.txt files (default: $CHATKIT_DEMO_DATA, else the "
                        f"bundled knowledge base, {DEFAULT_DATA_DIR})")
    parser.add_argument("--embeddings", choices=("minilm", "hash"), default=env.embeddings,
                        help="minilm: the local all-MiniLM-L6-v2; hash: fast, for smoke tests "
                        "(default: $CHATKIT_DEMO_EMBEDDINGS, else minilm)")
    parser.add_argument("--latency", type=float, default=env.latency,
                        help="seconds the extractive model takes per reply (default: $CHATKIT_DEMO_LATENCY, else 0)")
    parser.add_argument("--max-turns", type=int, default=defaults.max_turns, metavar="N",
                        help=f"messages one conversation accepts (default {defaults.max_turns})")
    parser.add_argument("--session-ttl", type=float, default=defaults.session_ttl, metavar="SECONDS",
                        help=f"a conversation without messages for this long expires (default {defaults.session_ttl:g})")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions, metavar="N",
                        help=f"conversations kept at most; the least recently used expire first (default {defaults.max_sessions})")
    parser.add_argument("--sweep-interval", type=float, default=defaults.sweep_interval, metavar="SECONDS",
                        help=f"seconds between two expiry sweeps (default {defaults.sweep_interval:g})")
    parser.add_argument("--chat-concurrency", type=int, default=CHAT_LIMIT, metavar="N",
                        help=f"chat events running at once across all visitors (default {CHAT_LIMIT}; "
                        "1 = Gradio's default single queue, for comparison)")
    args = parser.parse_args(argv)
    if args.port is None:
        try:
            args.port = int(env_port)
        except ValueError:
            parser.error(f"GRADIO_SERVER_PORT must be a port number, got {env_port!r}")
    if args.chat_concurrency < 1:
        parser.error(f"--chat-concurrency must be >= 1, got {args.chat_concurrency}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    for name in ("data", "model"):
        value = getattr(args, name)
        if value is not None and not value.is_dir():
            parser.error(f"--{name} {value} is not a directory")
    logins = {user for user, _ in args.auth or ()}
    for admin in args.admin or ():
        if admin not in logins:
            parser.error(f"--admin {admin}: there is no --auth login named {admin!r}")
    args.env_secret = env.secret_key
    try:
        config_from_args(args)
    except ValueError as exc:  # a limit the configuration refuses (--max-turns 0, ...)
        parser.error(str(exc))
    return args


def _parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASS with a non-empty user and password")
    return user, password


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` a parsed command line asks for.

    Raises:
        ValueError: a limit the configuration refuses.
    """
    defaults = DemoConfig()
    return DemoConfig(
        data_dir=args.data, model_dir=args.model, embeddings=args.embeddings, latency=args.latency,
        max_turns=getattr(args, "max_turns", defaults.max_turns),
        session_ttl=getattr(args, "session_ttl", defaults.session_ttl),
        max_sessions=getattr(args, "max_sessions", defaults.max_sessions),
        sweep_interval=getattr(args, "sweep_interval", defaults.sweep_interval),
        admins=frozenset(getattr(args, "admin", None) or ()),
        secret_key=getattr(args, "env_secret", None),
    )


def build_from_args(args: argparse.Namespace) -> gr.Blocks:
    """The demo app (with its own services) a parsed command line asks for; cheap, nothing loads yet."""
    services = DemoServices(config_from_args(args))
    return build_demo(services=services, chat_concurrency=args.chat_concurrency)


class PortBusy(OSError):
    """The port is taken (or can't be bound); ``str()`` is the one line the command prints."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(errno.EADDRINUSE, reason)
        self.host, self.port, self.reason = host, port, reason

    def __str__(self) -> str:
        return (
            f"error: cannot listen on {self.host}:{self.port} ({self.reason}). "
            f"Choose another port with --port (for example --port {self.port + 1 if self.port < 65535 else 7861})."
        )


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment, as the server will.

    Raises:
        PortBusy: it can't be bound (in use, or not allowed); the message names ``--port``.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise PortBusy(host, port, reason) from None


def serve(app: gr.Blocks, args: argparse.Namespace) -> int:
    """Launch ``app`` as ``args`` say, load its knowledge base in the background, serve until interrupted.

    Returns:
        The exit status: 0, or 2 when the port can't be used (one line says so, naming ``--port``).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatkit").setLevel(logging.INFO)  # ours; third-party request logs stay quiet
    services: DemoServices = app.chatkit_services  # type: ignore[attr-defined]  # set by build_demo
    config = services.config
    try:
        check_port(args.host, args.port)  # before anything heavy: a busy port fails in a second
    except PortBusy as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2
    if args.share and not args.auth:
        print(
            "WARNING: --share without --auth: anyone who gets the public link can use this demo. "
            "Add --auth USER:PASS to require a login.",
            file=sys.stderr, flush=True,
        )
    captured = io.StringIO()
    # quiet=True silences Gradio's hints (they name launch() arguments, not ours) except a failed share
    # link's; only then is stdout redirected (process-wide: never while Gradio's reload watcher may print)
    quiet_share = contextlib.redirect_stdout(captured) if args.share else contextlib.nullcontext()
    try:
        with quiet_share:
            app.launch(
                server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
                prevent_thread_lock=True, show_error=True, max_file_size=4 * config.max_upload_bytes, quiet=True,
                state_session_capacity=4 * config.max_sessions,  # Gradio's per-browser states, as many as pages
                **launch_kwargs(),
            )
    except OSError as exc:  # taken between the check and the launch
        print(PortBusy(args.host, args.port, "the port is already in use"), file=sys.stderr, flush=True)
        logging.getLogger("chatkit.demo").debug("launch failed: %s", exc)
        return 2
    print(f"Loading the knowledge base from {config.data_dir} ({config.embeddings} embeddings) in the background; "
          "the page says so until it is ready.", flush=True)
    services.start()
    if args.share:
        if app.share_url:
            print(f"Public link: {app.share_url}", flush=True)
        else:
            print(
                "NOTE: no public share link could be made (this machine cannot reach Gradio's share "
                f"server). The demo keeps serving locally at {app.local_url}",
                flush=True,
            )
    print(f"chatkit demo running at {app.local_url} (Ctrl+C to stop)", flush=True)
    if not args.share:
        print("For a public link (needs internet), restart with --share --auth USER:PASS.", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        services.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``chatkit-demo`` command: parse ``argv``, build the demo, serve it; returns the exit status."""
    args = parse_args(argv)
    return serve(build_from_args(args), args)
