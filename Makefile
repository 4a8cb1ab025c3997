# Everyday entry points. Each target sets the venv up first (a no-op when it is current).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PORT ?= 8000
PP_RATIO ?= 0.4
# Calibration windows (512 tokens each) of the first run's calibration, made once and cached.
PP_CALIBRATION_SAMPLES ?= 32
CLI := $(PYTHON) -m vllm_pp.tools.cli

.PHONY: setup serve test

setup:
	@bash scripts/setup.sh

# Serve the default model (SmolLM2-135M-Instruct) with probe pruning on, calibrated
# once on the first run (cached under ~/.cache/vllm-pp).
serve: setup
	@MODEL=$$($(CLI) model prepare --quiet) && \
	  CALIBRATION=$$($(CLI) calibrate --model "$$MODEL" --num-samples $(PP_CALIBRATION_SAMPLES) --dtype float32) && \
	  VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
	  $(VENV)/bin/vllm serve "$$MODEL" --served-model-name SmolLM2-135M-Instruct \
	    --pp-ratio $(PP_RATIO) --pp-calibration "$$CALIBRATION" --port $(PORT) \
	    --max-model-len 2048 --no-enable-prefix-caching

# The tests prepare the models and text they need (cached under ~/.cache/vllm-pp).
test: setup
	$(PYTHON) -m pytest -q tests
