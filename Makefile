# Every target sets itself up: it creates .venv if missing, installs CPU torch
# 2.13.0 before anything that depends on torch, then installs rollcast.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rollcast-installed
PYTEST_ARGS ?=

.PHONY: test demo up lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/rollcast demo

up: $(STAMP)
	$(VENV)/bin/rollcast up

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline models jobs tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline models jobs tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) .rollcast .pytest_cache
