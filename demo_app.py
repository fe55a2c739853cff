"""chatkit's multi-user Gradio demo: chat, a race lab and a live knowledge base, correct under concurrency.

Run it::

    python demo_app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS]
                       [--model DIR] [--data DIR] [--embeddings minilm|hash] [--latency SECONDS]
                       [--chat-concurrency N]

Design (see docs/readme/demo.md):

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

The code lives in the ``chatkit_demo/`` package next to this file (config, inputs, binding, services,
chat, knowledge, racelab, ui, cli); this module is the entry point and re-exports its public names.
"""

from __future__ import annotations

import sys

# chatkit_demo sets GRADIO_ANALYTICS_ENABLED before anything imports Gradio.
from chatkit_demo.binding import SessionBinder
from chatkit_demo.chat import DemoHandlers
from chatkit_demo.cli import main, parse_args
from chatkit_demo.config import CHAT_LIMIT, DEFAULT_DATA_DIR, DemoConfig
from chatkit_demo.inputs import UploadRejected, read_upload, validate_message
from chatkit_demo.knowledge import KnowledgeHandlers
from chatkit_demo.racelab import EXPERIMENTS, RaceLabHandlers
from chatkit_demo.services import _BURST, DemoServices
from chatkit_demo.ui import build_demo

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
    "demo",
    "main",
    "parse_args",
    "read_upload",
    "validate_message",
]

# Also used from here by tests and benchmarks.
_REEXPORTED = (CHAT_LIMIT, DEFAULT_DATA_DIR, _BURST)

demo = build_demo()

if __name__ == "__main__":
    sys.exit(main())
