# Every target sets up what it needs: a fresh machine with Python 3.11 runs
# `make run` or `make test` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_STAMP := cloudstate/.generated
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install protos lint unit test run cluster bench bench-readside bench-cluster clean

install: $(STAMP) $(PROTO_STAMP)

# Code generation first, so the editable install maps the generated `cloudstate`
# package too (the console script then works from any directory).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet 'grpcio-tools>=1.60,<2' 'googleapis-common-protos>=1.60,<2'
	$(PY) protos/generate.py
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(PROTO_STAMP): $(STAMP) $(PROTOS) protos/generate.py
	$(PY) protos/generate.py
	touch $(PROTO_STAMP)

protos: $(PROTO_STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q

test: lint unit

# The shopping-cart user function and the proxy on the embedded store.
run: install
	$(PY) -m tools.run_dev

# Three proxy nodes with a shopping cart each, sharing one Postgres
# (DATABASE_URL, else the local test database); see README.md, "Cluster".
cluster: install
	$(PY) -m tools.run_cluster

# Proxy and ceilings under the same load generator; see bench/README.md.
bench: install
	$(PY) -m bench.run

# Read side: live subscription lag under a write load, catch-up read rate.
bench-readside: install
	$(PY) -m bench.readside

# One node against three, and the cost of a forwarding hop; see bench/README.md.
bench-cluster: install
	$(PY) -m bench.cluster

clean:
	rm -rf $(VENV) cloudstate .pytest_cache .mypy_cache .ruff_cache
	find . -name '*_pb2*.py*' -not -path './.venv/*' -delete
