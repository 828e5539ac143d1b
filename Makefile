# Two commands for a new user on Debian 12: `make demo` and `make test`.
# Both install what is missing first (Debian packages, the virtualenv) and are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Front-end packages (package-lock.json), served by the service itself: htmx and uPlot for
# the pages, Swagger UI for /docs; axe-core for the accessibility tests.
NODE_STAMP := node_modules/.installed-$(shell cat package-lock.json | cksum | cut -d' ' -f1)

.PHONY: all deps demo test lint bench screenshots clean

all: test

deps: $(STAMP) $(NODE_STAMP)
	@./deploy/install-debian-packages.sh

$(STAMP): pyproject.toml
	@./deploy/install-debian-packages.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,build,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# npm ci installs exactly the locked versions; .npmrc keeps install scripts from running.
$(NODE_STAMP): package-lock.json
	@./deploy/install-debian-packages.sh
	npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

demo: deps
	$(BIN)/triage up --samples

test: deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Performance against the targets in BENCHMARKS.md (about 10 minutes on 2 cores);
# writes bench/results/latest.json, summary.md and plots.
bench: deps
	$(BIN)/python -m bench.run

# The README's pictures (docs/screenshots/*.png), taken in Chromium from a local stack
# with the sample studies (bench/screenshots.py).
screenshots: deps
	$(BIN)/python -m bench.screenshots

lint: deps
	$(BIN)/ruff check triage tests models
	$(BIN)/mypy triage

clean:
	rm -rf $(VENV) var node_modules
