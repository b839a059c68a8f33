# One entry point for developers and CI. Every target creates the virtualenv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: all venv test lint unit proto buf-lint demo bench bench-smoke clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## lint: ruff, mypy (strict on hand-written code) and buf lint on the contract
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(BUF) lint

## test: lint, then every test (unit, integration over real mTLS, PostgreSQL)
test: lint
	$(VENV)/bin/pytest -q

## proto: regenerate the committed Python stubs from proto/
proto: $(STAMP)
	$(PY) scripts/gen_protos.py

## demo: a whole federation on this machine, end to end
demo: $(STAMP)
	$(VENV)/bin/dmp demo

## bench: the benchmark figures (bench/results/latest.json)
bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
