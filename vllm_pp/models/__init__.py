"""vLLM model classes with probe pruning."""
