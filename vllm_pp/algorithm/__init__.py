"""Probe Pruning as small pure functions on tensors (no vLLM imports).

``probe``: which tokens of a scheduler step form the probe; ``history``: the
per-channel running statistics fused with the probe, plus calibration moments;
``scores``: channel and head importance (PPsp, Wanda-sp, FLAP); ``selection``:
pruning ratios, kept counts and kept indices, and FLAP's global allocation.
Section numbers in docstrings refer to docs/algorithm.md.
"""
