# Two entry points (README.md): `make repro` runs the experiment, `make test` the tests.
# Both create .venv on first use and reuse it afterwards.
#
# Order matters: torch is installed FIRST and pinned (constraints.txt via
# PIP_CONSTRAINT, which also holds inside isolated builds), then the rest, then
# this package WITHOUT build isolation so csrc/ compiles against that torch.
# Otherwise pip would fetch a several-GB CUDA torch onto a CPU machine.
VENV   ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

STAMP := $(VENV)/.installed

.PHONY: setup repro test test-fast cuda-check ui clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py $(wildcard csrc/*)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-build-isolation --use-pep517 -e .
	$(VENV)/bin/python -c "import mlsys.ops as o; print('mlsys ops backend:', o.backend())"
	touch $@

# `mlsys check` first: every stage's settings, so a typo fails here, not in the last stage
repro: $(STAMP)
	bin/mlsys check
	dvc repro

# one worker per core (TEST_WORKERS=0: one process); tests/conftest.py keeps a module's tests,
# and all tests of the session's micro pipeline, on one worker
TEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# the edit-test loop: everything but the end-to-end pipeline runs (docs/testing.md)
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not slow"

# the CUDA build of csrc/ without a GPU: fetches 0.63 GB once into $$MLSYS_CUDA_CACHE (default
# ~/.cache/mlsys/cuda-check), never into .venv; fails on a warning from csrc/ (.ci/run runs it)
cuda-check: $(STAMP)
	$(VENV)/bin/python benchmarks/cuda_check.py

ui: $(STAMP)
	$(VENV)/bin/python -m mlsys ui

clean-venv:
	rm -rf $(VENV)
