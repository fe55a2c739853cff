"""The one piece of build configuration pyproject.toml cannot express.

The demo's knowledge base lives in ``data/`` at the top of the repository, where users and the notebooks
see it; the wheel ships it as package data of the demo, ``chatkit_demo/data`` (found at run time with
``importlib.resources``, see ``chatkit_demo/config.py``). A ``package_dir`` mapping does that, but
pyproject's automatic discovery (``packages.find``) cannot be combined with a mapped package, so the
packages are discovered here: every package under ``chatkit/`` and ``chatkit_demo/``, found on the
filesystem (tests/test_packaging.py checks the wheel against the source tree). All metadata, the extras
and the package data patterns are in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["chatkit", "chatkit.*", "chatkit_demo", "chatkit_demo.*"]), "chatkit_demo.data"],
    package_dir={"chatkit_demo.data": "data"},
)
