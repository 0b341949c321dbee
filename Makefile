# blip2lab Makefile. `make test` on a fresh clone creates .venv, installs the
# project with its test extra, and runs the whole suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test bench clean

venv: $(STAMP)

# Create the virtual environment only if it does not exist yet.
$(PY):
	$(PYTHON) -m venv $(VENV)

# (Re)install whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/qformer.py

# Removes build artefacts and caches; keeps .venv (delete it by hand to rebuild).
clean:
	rm -rf build dist *.egg-info .pytest_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
