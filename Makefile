# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
VENV ?= .venv
PYTHON ?= python3
# Versions the project is tested with (found in local wheel caches); any torch>=2.4 works:
#   make test TORCH_SPEC='torch torchvision'
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Test processes (pytest-xdist); the suite is mostly single-threaded subprocess runs, so two use two cores well
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,export,data]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/refiner train --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
