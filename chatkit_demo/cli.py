"""The command line: :func:`parse_args`, :func:`config_from_args`, :func:`serve` and :func:`main`.

:func:`main` is the ``chatkit-demo`` command (a console script of the package); ``demo_app.py`` in a
checkout uses the same functions. Defaults come from the environment, so that a run without arguments
(``gradio demo_app.py`` on a Gradio whose CLI passes none) can be configured too: ``--host`` and
``--port`` from Gradio's own ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT`` (else 127.0.0.1 and 7860),
``--embeddings``, ``--data`` and ``--latency`` from ``CHATKIT_DEMO_EMBEDDINGS``, ``CHATKIT_DEMO_DATA`` and
``CHATKIT_DEMO_LATENCY`` (see :meth:`DemoConfig.from_env`). The command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

import chatkit

from .config import CHAT_LIMIT, DEFAULT_DATA_DIR, DemoConfig
from .services import DemoServices
from .ui import build_demo

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
    env_host = os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    env_port = os.environ.get("GRADIO_SERVER_PORT") or str(DEFAULT_PORT)
    parser.add_argument("--host", default=env_host,
                        help=f"interface to listen on (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    parser.add_argument("--auth", type=_parse_auth, default=None, metavar="USER:PASS", help="require a login")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a local Hugging Face causal-LM directory (default: the offline extractive model)")
    parser.add_argument("--data", type=Path, default=env.data_dir, metavar="DIR",
                        help="knowledge-base directory of .md/.txt files (default: $CHATKIT_DEMO_DATA, else the "
                        f"bundled knowledge base, {DEFAULT_DATA_DIR})")
    parser.add_argument("--embeddings", choices=("minilm", "hash"), default=env.embeddings,
                        help="minilm: the local all-MiniLM-L6-v2; hash: fast, for smoke tests "
                        "(default: $CHATKIT_DEMO_EMBEDDINGS, else minilm)")
    parser.add_argument("--latency", type=float, default=env.latency,
                        help="seconds the extractive model takes per reply (default: $CHATKIT_DEMO_LATENCY, else 0)")
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
    return args


def _parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must be USER:PASS with a non-empty user and password")
    return user, password


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` a parsed command line asks for."""
    return DemoConfig(data_dir=args.data, model_dir=args.model, embeddings=args.embeddings, latency=args.latency)


def build_from_args(args: argparse.Namespace) -> gr.Blocks:
    """The demo app (with its own services) a parsed command line asks for; cheap, nothing loads yet."""
    services = DemoServices(config_from_args(args))
    return build_demo(services=services, chat_concurrency=args.chat_concurrency)


def serve(app: gr.Blocks, args: argparse.Namespace) -> int:
    """Load ``app``'s knowledge base, launch it as ``args`` say, and serve until interrupted.

    Returns:
        The exit status (0).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatkit").setLevel(logging.INFO)  # ours; third-party request logs stay quiet
    services: DemoServices = app.chatkit_services  # type: ignore[attr-defined]  # set by build_demo
    config = services.config
    if args.share and args.auth is None:
        print(
            "WARNING: --share without --auth: anyone who gets the public link can use this demo. "
            "Add --auth USER:PASS to require a login.",
            file=sys.stderr, flush=True,
        )
    print(f"Loading the knowledge base from {config.data_dir} ({config.embeddings} embeddings)…", flush=True)
    chatkit.run(services.ready())
    app.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
        prevent_thread_lock=True, show_error=True, max_file_size=4 * config.max_upload_bytes,
    )
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
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``chatkit-demo`` command: parse ``argv``, build the demo, serve it; returns the exit status."""
    args = parse_args(argv)
    return serve(build_from_args(args), args)
