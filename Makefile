# Two commands do all the set-up: `make dev` and `make test` (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock lock-upgrade compose-tool test test-unit test-integration test-e2e test-packaging lint migrate dev bench clean

# The locks (requirements/*.lock, with hashes) are what the image, CI and `make install` install.
# `make lock` after editing pyproject.toml's dependencies keeps every other pin; `make lock-upgrade`
# moves everything to the newest releases the ranges allow.
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet

install: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lock: install
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) $(LOCK_ARGS) -o requirements/base.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) $(LOCK_ARGS) -o requirements/dev.lock

lock-upgrade:
	$(MAKE) lock LOCK_ARGS=--upgrade

# PostgreSQL and Redis: the ones at DATABASE_URL/REDIS_URL, or private ones started (and stopped)
# by deploy/services.sh when none answer there. pytest exits 5 when it collects nothing: make fails then.
TEST_SERVICES := deploy/services.sh run .dev/test-services
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider

test: install compose-tool
	$(TEST_SERVICES) $(PYTEST) $(PYTEST_ARGS)

# tests/integration/test_deploy_assets.py checks the compose files with Debian's docker-compose (v1,
# no daemon needed); installed here when missing and we are root, otherwise that test says what to do.
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] \
		|| (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
		|| echo "docker-compose could not be installed; the compose checks will fail"

test-unit: install
	$(PYTEST) tests/unit

test-integration: install compose-tool
	$(TEST_SERVICES) $(PYTEST) tests/integration

test-e2e: install
	$(TEST_SERVICES) $(PYTEST) tests/e2e

# The wheel, installed into a fresh venv: migrate, serve (until /readyz), create-tenant.
test-packaging: install
	$(TEST_SERVICES) $(PYTEST) tests/packaging

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy gateway_core
	$(BIN)/lint-imports

# Direct vs. bare proxy vs. gateway (tests/bench/bench_gateway.py; not a test), about 3 minutes; the
# table is appended to docs/performance.md. wrk is installed when missing, best effort; without it
# the bench uses its own python load generator.
# Extra options: make bench BENCH_ARGS="--workers 2 --soak --json bench.json" (see --help).
bench: install
	command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 \
		|| echo "wrk not available; the bench falls back to its python load generator"
	$(BIN)/python -m tests.bench.bench_gateway $(BENCH_ARGS)

migrate: install
	$(BIN)/neuronetz-gateway migrate

# The gateway on :8080 with a demo tenant and key, on local services (deploy/dev.sh says what it does).
dev: install
	deploy/dev.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
