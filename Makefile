# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs chatkit and runs the Gradio demo on http://127.0.0.1:7860
#   make test   creates or reuses .venv, installs, and runs every test (unit, property, doctests,
#               notebooks via nbval, the Gradio client and browser tests, and the packaging tests: the
#               built wheel installed into fresh virtualenvs from .venv/wheels, with no download)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every wheel `make install` resolved for .[dev], kept so that the packaging tests can install the built
# wheel into fresh virtualenvs offline (pip's own cache cannot: this machine's index sends no cache headers).
WHEELS := $(VENV)/wheels
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench chromium servers clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	mkdir -p $(WHEELS)
	@# offline first (pip would download again what the wheelhouse holds); online only for what is new
	$(PIP) wheel --no-index --find-links $(WHEELS) --wheel-dir $(WHEELS) ".[dev]" 2>/dev/null \
	  || $(PIP) wheel --find-links $(WHEELS) --wheel-dir $(WHEELS) ".[dev]"
	rm -f $(WHEELS)/chatkit-*.whl
	$(PIP) install --no-index --find-links $(WHEELS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The browser tests drive Debian's chromium (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

# The scale-out tests start their own redis-server (Debian's) and PostgreSQL cluster on loopback ports.
servers:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server for the scale-out tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server; }

demo: install
	$(BIN)/python demo_app.py

test: install chromium servers
	CHATKIT_REQUIRE_SERVERS=1 CHATKIT_WHEELHOUSE=$(CURDIR)/$(WHEELS) $(BIN)/python -m pytest --doctest-modules \
	  --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg \
	  chatkit chatkit_demo demo_app.py tests notebooks $(PYTEST_ARGS)

# Everything but notebooks, browser, model and packaging tests, for a quick edit-test loop.
test-fast: install
	$(BIN)/python -m pytest --doctest-modules chatkit chatkit_demo demo_app.py tests \
	  -m "not browser and not model and not packaging" $(PYTEST_ARGS)

bench: install
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis test-artifacts
