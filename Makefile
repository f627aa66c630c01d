# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install install-run run test lint fuzz redis-server chromium bench bench-quick bench-cluster clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# What the server needs (`make run`): the package and uvloop. The test extras only for the suite and tools.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[speed]'
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.installed-run
	$(PY) -m pip install -q -e '.[test,speed]'
	touch $@

install-run: $(VENV)/.installed-run

install: $(VENV)/.installed

# The suite starts its own redis-server on a free port; install Debian's package when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "redis-server not found: installing Debian's redis-server package"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
	  else \
	    echo "redis-server is not on PATH. Install it (Debian/Ubuntu: sudo apt-get install -y redis-server;"; \
	    echo "macOS: brew install redis) or set REDIS_URL to a Redis 7 you can flush."; exit 1; \
	  fi; }

# The browser tests drive Debian's chromium through Playwright's Python package (from the test extra);
# Playwright's own browser downloads are never used. PRESENCE_CHROMIUM points the tests at another binary.
CHROMIUM ?= $(or $(PRESENCE_CHROMIUM),/usr/bin/chromium)
chromium:
	@[ -x "$(CHROMIUM)" ] || { \
	  if [ "$(CHROMIUM)" = /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "$(CHROMIUM) not found: installing Debian's chromium package"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "$(CHROMIUM) is missing. Install Chromium (Debian: sudo apt-get install -y chromium)"; \
	    echo "or set PRESENCE_CHROMIUM to a Chromium or Chrome binary."; exit 1; \
	  fi; }

run: install-run
	$(VENV)/bin/presence serve

test: install redis-server chromium
	$(PY) -m pytest

# Fuzz the frame codec and the userSign verifier (atheris, from the test extra); FUZZ_SECONDS=600 for longer.
FUZZ_SECONDS ?= 60
fuzz: install
	$(PY) fuzz/fuzz_presence.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

# ruff (lint and format) and mypy (strict on presence/; tests/, bench/, fuzz/ against its API: pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build dist

# Benchmarks (bench/, results in BENCHMARKS.md and bench/results/): a private redis-server, real `presence serve`
# and seed-gateway processes, WebSocket clients in separate processes. bench-quick takes about 2-3 minutes.
bench: install redis-server
	$(PY) -m pip install -q matplotlib py-spy
	$(PY) -m bench.run --full

bench-quick: install redis-server
	$(PY) -m pip install -q matplotlib py-spy
	$(PY) -m bench.run --quick

# One redis-server beside a local 3-primary Redis Cluster: requests, commands and time per change and per query.
bench-cluster: install redis-server
	$(PY) -m bench.cluster
