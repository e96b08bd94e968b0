# The two commands a user needs: `make demo` and `make test`. Each sets up
# .venv (torch pinned to the local CPU build) and the etcd server first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test lint typecheck protos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-etcd.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	bash scripts/ensure-etcd.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/epctl demo

test: setup lint typecheck
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

protos: setup
	$(PY) -m protos.generate

# Every benchmark, one after another, --quick (several minutes here); FULL=1 runs
# the full sizes (much longer), ONLY="hook fanout" some of them. Rewrites the
# generated sections of BENCHMARKS.md and bench/stall.png; the JSON reports
# stay in out/bench/.
bench: setup
	$(PY) -m bench.report $(if $(FULL),--full) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
