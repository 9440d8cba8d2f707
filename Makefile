# One venv, built from the repo's own pinned files. `make test` and `make demo`
# build it on a fresh machine; both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv fashion-mnist test test-all demo bench clean

venv: $(STAMP) fashion-mnist

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -r requirements.txt
	# TFF pins jaxlib==0.4.14, which the registry lacks; its other pins are in
	# requirements.txt, so it goes in without dependency resolution.
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist. Installed where we
# can (root with apt-get); elsewhere only that data set is missing, so say how
# to get it and go on: tds.data.load('fashion_mnist') then explains too.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo 'warning: apt-get could not install dataset-fashion-mnist;' \
	    "tds.data.load('fashion_mnist') will be unavailable"; \
	else \
	  echo "skipping Fashion-MNIST: needs root and apt-get" \
	    "(apt-get install dataset-fashion-mnist)"; \
	fi

test: venv
	$(PY) -m pytest

test-all: venv
	$(PY) -m pytest --runslow

# The main job: DP-sparse federated training on HAPT (tf-dpsparse run).
demo: venv
	$(VENV)/bin/tf-dpsparse run

# Each benchmark, and the paper table's quick set-up (digits, a few minutes;
# the full HAPT and MNIST tables take about an hour each: tf-dpsparse bench
# --dataset hapt|mnist).
bench: venv
	$(PY) benchmarks/codec_bench.py
	$(PY) benchmarks/lite_bench.py
	$(PY) benchmarks/keras_bench.py
	$(PY) benchmarks/fed_bench.py
	$(VENV)/bin/tf-dpsparse bench --quick --no-progress \
	  --out benchmarks/results/paper_table_quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
