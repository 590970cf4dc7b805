# Two entry points for a fresh clone: `make demo` and `make test`. Each creates or reuses .venv.
# torch is pinned by constraints.txt to the CPU build these machines carry; on a GPU machine,
# install your CUDA torch first (or run `make venv CONSTRAINTS=`).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,export]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/distill run configs/quickstart.yaml

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf runs/ .pytest_cache
