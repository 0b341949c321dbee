# blip2lab Makefile. `make test` on a fresh clone creates .venv, installs the
# project with its test extra, and runs the whole suite. `make app` starts the Gradio
# app (the test extra includes the app's, so one .venv serves both).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test bench app clean

venv: $(STAMP)

# Create the virtual environment only if it does not exist yet.
$(PY):
	$(PYTHON) -m venv $(VENV)

# (Re)install whenever pyproject.toml changes. The browser tests drive Debian's Chromium
# (never a browser downloaded by playwright); install it when missing (needs root).
$(STAMP): pyproject.toml | $(PY)
	command -v chromium >/dev/null 2>&1 || apt-get install -y chromium || (apt-get update && apt-get install -y chromium)
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/qformer.py

# The Gradio app on http://127.0.0.1:7860 (BLIP2LAB_MODEL, BLIP2LAB_PORT, ...: see app.py).
app: $(STAMP)
	$(PY) app.py

# Removes build artefacts and caches; keeps .venv (delete it by hand to rebuild).
clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
