"""The per-worker pruning runtime: step view, attention interface, block adapters, pruned execution.

Imports and runs with torch alone (no vLLM): the vLLM model classes in
vllm_pp/integration/ feed it, and a benchmark can drive it on any torch device.
"""
