# Two commands for a new user on Debian 12: `make demo` and `make test`.
# Both install what is missing first (Debian packages, the virtualenv) and are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Python packages: requirements/dev.lock (exact versions with their SHA-256 hashes, written
# by `make lock` from pyproject.toml), then the project itself without dependencies.
DEV_LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(DEV_LOCK) 2>/dev/null | cksum | cut -d' ' -f1)
# Front-end packages (package-lock.json), served by the service itself: htmx and uPlot for
# the pages, Swagger UI for /docs; axe-core for the accessibility tests.
NODE_STAMP := node_modules/.installed-$(shell cat package-lock.json | cksum | cut -d' ' -f1)

.PHONY: all deps demo test test-deploy lint bench screenshots clean lock

all: test

deps: $(STAMP) $(NODE_STAMP)
	@./deploy/install-debian-packages.sh

$(STAMP): pyproject.toml $(DEV_LOCK)
	@./deploy/install-debian-packages.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# The lock files of requirements/, from pyproject.toml, for CPython 3.11 on Linux x86_64:
#   runtime.lock  [project] dependencies: what deploy/Dockerfile installs
#   dev.lock      runtime + the test, build and bench extras: what the virtualenv gets
#   gpu.lock      runtime with onnxruntime-gpu instead of onnxruntime (GPU worker images)
# Run it after changing the dependencies in pyproject.toml; versions already locked are kept
# where they still fit. `make lock LOCK_ARGS=--upgrade` moves everything to the newest
# versions, `LOCK_ARGS='--upgrade-package numpy'` one package. The locking tool (uv) is itself
# installed from requirements/tools.lock, with hashes, into a virtualenv of its own.
LOCK_TOOLS := $(VENV)/lock-tools
LOCK_ARGS ?=
UV_COMPILE = $(LOCK_TOOLS)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_36 --index-url https://pypi.org/simple \
	--custom-compile-command 'make lock' $(LOCK_ARGS)

lock:
	@test -x $(LOCK_TOOLS)/bin/python || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install -q --require-hashes -r requirements/tools.lock
	$(UV_COMPILE) requirements/tools.in -o requirements/tools.lock
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.lock
	$(UV_COMPILE) pyproject.toml --extra test --extra build --extra bench \
		--constraint requirements/runtime.lock -o $(DEV_LOCK)
	$(LOCK_TOOLS)/bin/python requirements/gpu_in.py > requirements/gpu.in
	$(UV_COMPILE) requirements/gpu.in --constraint requirements/runtime.lock \
		-o requirements/gpu.lock

# npm ci installs exactly the locked versions; .npmrc keeps install scripts from running.
$(NODE_STAMP): package-lock.json
	@./deploy/install-debian-packages.sh
	npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

demo: deps
	$(BIN)/triage up --samples

test: deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The deployment as hospitals run it (about 10 minutes here, after the images are built):
# installs podman, runc, docker-compose and mmdebstrap from Debian, builds the four images
# from deploy/ (the base with mmdebstrap when no registry answers), then starts
# docker-compose.yml with docker-compose against podman and drives it (tests/deploy).
test-deploy: deps
	./deploy/build-images.sh
	TRIAGE_TEST_DEPLOY=1 $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/deploy $(PYTEST_ARGS)

# Performance against the targets in BENCHMARKS.md (about 20 minutes on 2 cores);
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
