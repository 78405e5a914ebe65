# The dev loop, one entry point. Every target works from a fresh clone (the venv is made on demand).
# `make unit` needs no service; `make test` starts the embedded stack (scripts/stack.sh) first.
.PHONY: help venv format lint typecheck unit test ci bench bench-versus mutation

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

typecheck: venv  ## mypy over the whole tree (exclusions in pyproject.toml)
	$(PY) -m mypy

# The quick loop: the simulation tries SIM_SEEDS seeds (CI and scripts/test.sh: 3,000), and the
# tests that run ruff and mypy over the tree (marker `static`) are left to `make lint` / `make typecheck`.
SIM_SEEDS ?= 300
unit: venv  ## unit tests only: no service, no network, ~12 s (300 simulation seeds; ruff/mypy in lint/typecheck)
	SIM_SEEDS=$(SIM_SEEDS) PYTEST_ADDOPTS='-m "not static"' bash scripts/test.sh tests/unit -q

test:  ## the whole suite with the embedded stack (what CI runs, without CI=true)
	bash scripts/test.sh -q

ci:  ## exactly what CI runs
	bash .ci/run

bench: venv  ## the throughput, CPU and large-body benchmarks; write docs/benchmarks.md
	bash -c 'source scripts/setup.sh requirements-dev.txt && PYTHONPATH=scripts python -m bench.run --rss --cpu --markdown docs/benchmarks.md && PYTHONPATH=scripts python -m bench.large_bodies --markdown docs/benchmarks.md'

bench-versus: venv  ## the sink's rate of this checkout beside BASELINE's (default main), alternately
	bash -c 'source scripts/setup.sh requirements-dev.txt && PYTHONPATH=scripts python -m bench.sink_versus --baseline $${BASELINE:-main}'

# Mutation testing (mutmut, [tool.mutmut] in pyproject.toml) of the loop's modules against the unit
# tests; not run in CI: hours on 2 cores for every module. MUTANTS narrows it to mutmut's name globs,
# e.g. MUTANTS='retry* aws.visibility*'. The simulation runs 60 seeds per mutant; MUTATION_JOBS mutants
# at a time (1: the machine is shared). Survivors that no test should kill: docs/mutation-equivalent.md.
MUTANTS ?=
MUTATION_JOBS ?= 1
mutation: venv  ## mutation testing of the loop (slow; not in CI): writes docs/mutation.md
	rm -rf mutants
	SIM_SEEDS=60 $(PY) -m mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS); $(PY) scripts/mutation_report.py > docs/mutation.md
	rm -rf mutants  # a copy of the tree: the tests that read every file would read it too
