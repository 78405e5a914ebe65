# The dev loop, one entry point. Every target works from a fresh clone (the venv is made on demand).
# `make unit` needs no service; `make test` starts the embedded stack (scripts/stack.sh) first.
.PHONY: help venv format lint typecheck unit test ci bench

PY := .venv/bin/python

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv:  ## the virtual environment with the dev requirements (no service started)
	SETUP_SERVICES=0 bash -c 'source scripts/setup.sh requirements-dev.txt'

format: venv  ## ruff's safe fixes (imports sorted), then ruff format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

lint: venv  ## ruff check and ruff format --check, as CI runs them
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv  ## mypy over the files listed in pyproject.toml
	$(PY) -m mypy

unit: venv  ## unit tests only: no service, no network, seconds
	bash scripts/test.sh tests/unit -q

test:  ## the whole suite with the embedded stack (what CI runs, without CI=true)
	bash scripts/test.sh -q

ci:  ## exactly what CI runs
	bash .ci/run

bench: venv  ## the throughput benchmark; writes docs/benchmarks.md
	bash -c 'source scripts/setup.sh requirements-dev.txt && python bench/run.py --rss --markdown docs/benchmarks.md'
