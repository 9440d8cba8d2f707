# One venv, built from the repo's own pinned files. `make test` and `make demo`
# build it on a fresh machine; both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -r requirements.txt
	# TFF pins jaxlib==0.4.14, which the registry lacks; its other pins are in
	# requirements.txt, so it goes in without dependency resolution.
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m pytest

test-all: venv
	$(PY) -m pytest --runslow

demo: venv
	$(PY) examples/core_pipeline.py

bench: venv
	$(PY) benchmarks/codec_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
