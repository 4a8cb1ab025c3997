# Everyday entry points. Each target sets the venv up first (a no-op when it is current).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PORT ?= 8000
PP_RATIO ?= 0.4

.PHONY: setup serve test

setup:
	@bash scripts/setup.sh

# Serve the embedded default model (SmolLM2-135M-Instruct) with probe pruning on.
serve: setup
	@MODEL=$$($(PYTHON) -m vllm_pp.cli model prepare --quiet) && \
	  VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
	  $(VENV)/bin/vllm serve "$$MODEL" --pp-ratio $(PP_RATIO) --port $(PORT) \
	    --max-model-len 2048 --no-enable-prefix-caching

# The tests prepare the models and text they need (cached under ~/.cache/vllm-pp).
test: setup
	$(PYTHON) -m pytest -q tests
