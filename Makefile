# dsft — make demo / make test. Override TORCH for a GPU build: make demo TORCH="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test install install-dev lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,ray,track,qlora,deepspeed]'
	touch $(DEVSTAMP)

install: $(STAMP)
install-dev: $(DEVSTAMP)

demo: $(STAMP)
	$(VENV)/bin/dsft demo --out runs/demo --force

test: $(DEVSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --timeout 900 tests

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
