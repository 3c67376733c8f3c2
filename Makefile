# Two commands do all the set-up: `make dev` and `make test` (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-unit test-integration test-e2e lint migrate dev bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# pytest exits 5 when it collects nothing; make treats that as a failure too.
test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

test-integration: install
	$(BIN)/python -m pytest -q tests/integration

test-e2e: install
	$(BIN)/python -m pytest -q tests/e2e

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
