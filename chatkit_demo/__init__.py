"""chatkit's multi-user Gradio demo (app code, not part of the ``chatkit`` library): ``pip install "chatkit[demo]"``.

Start it with the ``chatkit-demo`` command (installed with the package) or, in a checkout, ``python demo_app.py``
or ``gradio demo_app.py`` (Gradio's reload mode). Both take the same options (``--help``).
Modules: ``config`` (DemoConfig, limits, the bundled knowledge base), ``inputs`` (message and upload checks),
``binding`` (SessionBinder), ``services`` (DemoServices), ``chat`` / ``knowledge`` / ``racelab`` (the three tabs'
handlers), ``ui`` (build_demo), ``cli`` (parse_args, main: the ``chatkit-demo`` command). The knowledge base
ships as package data (``chatkit_demo/data`` in the wheel, ``data/`` at the top of a checkout).

Importing this package without Gradio raises ``ModuleNotFoundError`` naming the ``demo`` extra.
"""

import os

from chatkit._optional import optional_import

# Gradio reads this at import time; without it it tries to reach its analytics server.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
optional_import("gradio", extra="demo", feature="chatkit's demo")
