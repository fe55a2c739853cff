"""chatkit's multi-user Gradio demo: chat, a race lab and a live knowledge base, correct under concurrency.

Run it from a checkout (installed, the same demo is the ``chatkit-demo`` command)::

    python demo_app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS]
                       [--model DIR] [--data DIR] [--embeddings minilm|hash] [--latency SECONDS]
                       [--chat-concurrency N]
    gradio demo_app.py [-- OPTIONS]     # Gradio's reload mode: the page follows your code changes

``--host`` / ``--port`` default to ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.

Design (README.md, section "The demo"):

* ``demo`` is built at module level and launched only under ``__main__``; building it loads nothing
  heavy. The embedding model, the knowledge base and the :class:`chatkit.SessionManager` are created on
  first use by :class:`DemoServices` (app-wide services, like a database: never per-user globals).
* Every browser session (Gradio's ``session_hash``, plus the login name under ``--auth``) gets its own
  chatkit session, created on its first message and bound to it in :class:`SessionBinder`. Chat
  history lives in the ``SessionManager`` (LangGraph checkpoints), never only in ``gr.State``. A session
  id sent by a client is only ever accepted after a binding check; foreign ids are refused.
* Events have generous concurrency limits so different sessions run in parallel; the turns of one
  session are serialized by chatkit's per-session lock, not by Gradio's queue.
* The handlers are plain (async) methods of :class:`DemoHandlers`; tests call them directly with a
  ``gr.Request(session_hash=...)``.
* Reload mode: ``gradio demo_app.py`` runs this file as ``__main__``, then re-runs it in a watcher thread
  at start and after every change, with ``gr.NO_RELOAD`` false. Only the first run serves (and loads the
  knowledge base); the re-runs just rebuild ``demo``, which Gradio swaps in (its services load on the first
  request after a change).

The code lives in the ``chatkit_demo/`` package next to this file (config, inputs, binding, services,
chat, knowledge, racelab, ui, cli); this module is the entry point and re-exports its public names.
"""

from __future__ import annotations

import sys

# chatkit_demo first: it sets GRADIO_ANALYTICS_ENABLED and names the missing extra if Gradio is absent.
from chatkit_demo.binding import SessionBinder
from chatkit_demo.chat import DemoHandlers
from chatkit_demo.cli import build_from_args, config_from_args, main, parse_args, serve
from chatkit_demo.config import CHAT_LIMIT, DEFAULT_DATA_DIR, DemoConfig
from chatkit_demo.inputs import UploadRejected, read_upload, validate_message
from chatkit_demo.knowledge import KnowledgeHandlers
from chatkit_demo.racelab import EXPERIMENTS, RaceLabHandlers
from chatkit_demo.services import _BURST, DemoServices
from chatkit_demo.ui import build_demo

import gradio as gr  # isort: skip

__all__ = [
    "DemoConfig",
    "DemoServices",
    "DemoHandlers",
    "EXPERIMENTS",
    "KnowledgeHandlers",
    "RaceLabHandlers",
    "SessionBinder",
    "UploadRejected",
    "build_demo",
    "config_from_args",
    "demo",
    "main",
    "parse_args",
    "read_upload",
    "serve",
    "validate_message",
]

# Also used from here by tests and benchmarks.
_REEXPORTED = (CHAT_LIMIT, DEFAULT_DATA_DIR, _BURST)

# Run as a script, the command line configures the demo; imported (tests, notebooks), the environment does.
_ARGS = parse_args() if __name__ == "__main__" else None
demo = build_demo() if _ARGS is None else build_from_args(_ARGS)

if __name__ == "__main__" and gr.NO_RELOAD:  # in reload mode, only the first run serves
    sys.exit(serve(demo, _ARGS))
