# Every target creates the virtualenv it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs bench bench-cpu bench-local bench-smoke example example-fastapi clean

demo: $(VENV)/.installed-embedded  ## run the guided demo (embedded Redis + SQLite, or REDIS_URL)
	$(BIN)/python -m alkey demo

test: $(VENV)/.installed-test  ## run the test suite (starts its own redis-server)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev  ## ruff, mypy --strict and the import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

docs: $(VENV)/.installed-docs  ## the documentation site, warnings as errors: docs/_build/html
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html

bench: $(VENV)/.installed-bench  ## full benchmark: writes docs/benchmarks.md and .png
	$(BIN)/python -m benchmarks

bench-cpu: $(VENV)/.installed-bench  ## alkey's CPU per call, this tree against an earlier one: docs/cpu.md
	$(BIN)/python -m benchmarks.cpu

bench-local: $(VENV)/.installed-bench  ## the local token cache: warm keys, invalidation delay, server cost: docs/localcache.md
	$(BIN)/python -m benchmarks.localcache

bench-cdc: $(VENV)/.installed-bench  ## the lag of outside writes, alkey listen: docs/cdc.md and .png
	$(BIN)/python -m benchmarks.cdc

bench-smoke: $(VENV)/.installed-test  ## seconds: fails if a round trip or a call/line budget regresses (cluster too)
	$(BIN)/python -m benchmarks --smoke
	$(BIN)/python -m benchmarks.cluster --smoke
	$(BIN)/python -m benchmarks.localcache --smoke
	$(BIN)/python -m benchmarks.cdc --smoke

example: $(VENV)/.installed-example  ## the Pyramid example app on http://localhost:6543
	PYTHONPATH=examples/pyramid_app $(BIN)/pserve examples/pyramid_app/development.ini

example-fastapi: $(VENV)/.installed-example-fastapi  ## the FastAPI example on http://localhost:8000
	$(BIN)/uvicorn --factory fastapi_app:create_app --app-dir examples/fastapi_app

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis

# One stamp per extra: reinstalls when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@
