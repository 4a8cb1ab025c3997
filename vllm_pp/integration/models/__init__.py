"""vLLM's LLaMA and OPT model classes with probe pruning (vanilla vLLM when pruning is off)."""
