# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment, install the pinned dependencies and the offline data first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.richkd-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1

.PHONY: setup data demo test test-fast clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Real labelled data that works offline: Debian's Fashion-MNIST package (60k + 10k images).
data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup data
	$(VENV)/bin/richkd demo

test: setup data
	$(PY) -m pytest -q

test-fast: setup data
	$(PY) -m pytest -q -m "not slow"

clean-runs:
	rm -rf tune_runs/demo tune_runs/runs tune_runs/cache tune_runs/mlflow.db
