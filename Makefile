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

.PHONY: install demo test browser clang lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,export,data,app]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/refiner train --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS)

# Debian's Chromium for the browser test of `refiner app` (tests/test_app_browser.py; without it that test skips).
# Installs it with apt-get when run as root and it is missing; otherwise says what to run.
browser:
	@command -v chromium >/dev/null && echo "chromium: $$(command -v chromium)" || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	{ echo "make browser: chromium is not installed; as root: apt-get install chromium"; exit 1; }

# clang, the second compiler the native kernels are built and checked with (tests/test_ops_build.py; without it that
# test skips). Installs it with apt-get when run as root and it is missing; otherwise says what to run.
clang:
	@command -v clang >/dev/null && echo "clang: $$(command -v clang)" || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang; } || \
	{ echo "make clang: clang is not installed; as root: apt-get install clang"; exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
