# Every target sets itself up: it creates .venv if missing, installs CPU torch
# 2.13.0 before anything that depends on torch, then installs rollcast.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rollcast-installed
PYTEST_ARGS ?=

.PHONY: test demo up lint format bench clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's chromium for the MLflow UI browser test, installed when we are root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed and not root: the browser test will be skipped"; fi; }

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
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/forecast_latency.py

clean:
	rm -rf $(VENV) .rollcast .pytest_cache
