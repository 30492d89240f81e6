# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment, install the pinned dependencies and the offline data first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.richkd-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1

.PHONY: setup data browser demo test test-fast sweep-smoke clean-runs

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

# Headless Chromium: the report test renders the sweep report page and screenshots it.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

demo: setup data
	$(VENV)/bin/richkd demo

# Tests start many short-lived embedded Ray clusters; Ray's token auth stays on for the demo and your sweeps
# (Ray's services listen on all interfaces, and the token is what keeps other hosts out).
test test-fast: export RAY_AUTH_MODE ?= disabled

# Two pytest-xdist workers, each with its own embedded Ray: the slow tests mostly wait on processes (sweeps, Ray,
# MLflow servers), not on the CPU, so two at a time take ~2/3 of the time on 2 cores.
test: setup data browser
	$(PY) -m pytest -q -n 2 --durations=20

# A 3-trial sweep on the demo's teacher, CLIP and caches (run `make demo` first).
sweep-smoke: setup
	$(VENV)/bin/richkd sweep search_spaces/smoke.yaml --name smoke_$$(date +%Y%m%d_%H%M%S)

test-fast: setup data
	$(PY) -m pytest -q -n 2 -m "not slow"

# Everything under tune_runs/ except its README: demo, sweeps, caches, the MLflow store.
clean-runs:
	find tune_runs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
