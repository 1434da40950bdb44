# Every target sets itself up: it creates .venv if missing, installs CPU torch
# 2.13.0 before anything that depends on torch, then installs rollcast.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rollcast-installed
PYTEST_ARGS ?=
# pytest-xdist workers: most tests wait on real processes (group joins, restarts, MLflow), so two
# workers on two cores roughly halve the wall time; 0 runs in this process (needed for -s output)
TEST_WORKERS ?= 2

.PHONY: test demo up lint format bench clean browser fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# lint-imports first: the layering contracts in pyproject.toml ([tool.importlinter]) hold on every run
test: $(STAMP) browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

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

# Coverage-guided fuzzing of the decoder (atheris): new inputs go to $(FUZZ_DIR)/corpus, a crashing
# one to $(FUZZ_DIR)/crash-*; copy those into tests/pipeline/ingest/fuzz_corpus/regressions/ (replayed by make test).
# fuzz_corpus/seeds/ is the minimised corpus of the long runs recorded in BENCHMARKS.md (also replayed).
FUZZ_SECONDS ?= 600
FUZZ_DIR ?= .rollcast/fuzz
fuzz: $(STAMP)
	mkdir -p $(FUZZ_DIR)/corpus
	PYTHONPATH=$(CURDIR) RUST_BACKTRACE=0 nice -n 19 $(PY) tests/support/fuzz_decode.py -max_total_time=$(FUZZ_SECONDS) \
	  -max_len=4096 -len_control=0 -timeout=30 -rss_limit_mb=6000 -artifact_prefix=$(FUZZ_DIR)/ \
	  $(FUZZ_DIR)/corpus tests/pipeline/ingest/fuzz_corpus/seeds tests/pipeline/ingest/fuzz_corpus/regressions

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline models jobs tests benchmarks
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline models jobs tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/forecast_latency.py

clean:
	rm -rf $(VENV) .rollcast .pytest_cache
