# The two commands: `make run` and `make test`. Everything installs itself into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp
PYTEST_COV := --cov=server --cov=resource_server --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=95
# Two workers: this machine has two cores (pytest-xdist; each worker has its own databases).
## worksteal: an idle worker takes queued tests from the busy one (the long tests at the end).
PYTEST_WORKERS ?= -n 2 --dist worksteal

.PHONY: install run test lint format report bench clean

$(STAMP): pyproject.toml resource_server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The resource servers' kit: a package of its own (README, "For resource servers").
	$(PY) -m pip install --quiet -e './resource_server[fastapi]'
	touch $(STAMP)

install: $(STAMP)

## The Node client library the interop test drives (tests/interop_node); skipped without npm.
NODE_DEPS := tests/interop_node/node_modules/.package-lock.json
$(NODE_DEPS): tests/interop_node/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/interop_node --no-audit --no-fund --loglevel=error \
			|| echo "npm ci failed: the oauth4webapi interop test will be skipped"; \
	else echo "npm not found: the oauth4webapi interop test will be skipped"; fi

## Serve on http://127.0.0.1:$(PORT) with SQLite, dev keys and a demo client and user.
run: export AUTH_ISSUER ?= http://127.0.0.1:$(PORT)
run: install
	$(PY) -m server migrate
	$(PY) -m server seed-demo
	$(PY) -m server serve --port $(PORT)

## The whole suite, with line and branch coverage of server/ (fails below 95%).
test: install $(NODE_DEPS)
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_COV)

lint: install
	$(VENV)/bin/ruff check server resource_server examples tests migrations bench
	$(VENV)/bin/ruff format --check server resource_server examples tests migrations bench
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix server resource_server examples tests migrations bench
	$(VENV)/bin/ruff format server resource_server examples tests migrations bench

## Run the suite and write artifacts/auth-test/ (features.json, test-results.md); the browser
## test refreshes artifacts/screenshots/*.png.
report: export AUTH_SCREENSHOT_DIR := $(CURDIR)/artifacts/screenshots
report: install $(NODE_DEPS)
	mkdir -p artifacts/auth-test "$$AUTH_SCREENSHOT_DIR"
	set -o pipefail; $(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_COV) --report-dir artifacts/auth-test 2>&1 \
		| tee artifacts/auth-test/pytest-output.txt; status=$$?; \
		$(PY) -m tests.report_md artifacts/auth-test && exit $$status

## Load benchmark: real servers (SQLite and PostgreSQL, 1 and 2 workers) under wrk, against
## floors and node-oidc-provider (bench/node) measured in the same run; writes
## artifacts/benchmarks.md and artifacts/benchmarks.png. Without npm the peer is not measured.
bench: install
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	if command -v npm >/dev/null; then \
		npm ci --prefix bench/node --no-audit --no-fund --loglevel=error \
			|| echo "npm ci failed: node-oidc-provider will not be measured"; \
	else echo "npm not found: node-oidc-provider will not be measured"; fi
	$(PY) -m bench.kit
	$(PY) -m bench.run
	$(PY) -m bench.outage

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
