"""Offline tools: the ``vllm-pp`` CLI, assets (default model, text, random models),
the engine factory, calibration and perplexity runs."""
