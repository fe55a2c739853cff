"""The pieces of chatkit's Gradio demo (app code, not part of the ``chatkit`` library).

``demo_app.py`` in the repository root is the entry point: it builds ``demo`` and runs :func:`cli.main`.
Modules: ``config`` (DemoConfig, limits), ``inputs`` (message and upload checks), ``binding``
(SessionBinder), ``services`` (DemoServices), ``chat`` / ``knowledge`` / ``racelab`` (the three tabs'
handlers), ``ui`` (build_demo), ``cli`` (parse_args, main).
"""

import os

# Gradio reads this at import time; without it it tries to reach its analytics server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
