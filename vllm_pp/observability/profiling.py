"""Per-step cost breakdown of the pruned path, switched on by ``VLLM_PP_PROFILE=1``.

Functions on the pruned path are wrapped with :func:`timed` under one of the
:data:`SECTIONS`. With the variable unset (the default) ``timed`` returns the
function itself, so serving pays nothing. With it set, each call adds its wall
time to its section in this process; ``benchmarks/throughput.py --breakdown``
reads the totals with :func:`snapshot` from an in-process engine and reports
them as shares of the engine's wall time.

Wall time is the right measure on the CPU, where every op finishes before it
returns. On an accelerator the sections would need a device synchronisation
(use ``torch.profiler`` there instead).

Sections must not nest: a timed function never calls another one.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, TypeVar

ENV = "VLLM_PP_PROFILE"
ENABLED = os.environ.get(ENV, "0") not in ("", "0")

SECTIONS = (
    "probe",  # choosing the probe tokens and running them through the block
    "scoring",  # fusing probe and history, PPsp scores
    "selection",  # top-k of the scores
    "history update",  # EMA of the kept channels' statistics
    "weight preparation",  # bringing the kept rows/columns into the packed weights
    "pruned GEMMs",  # o_proj, gate_up, down on the kept units
    "q/k/v projection",  # of the pruned layers (dense: K/V of every head are cached)
    "attention",  # rotary, KV-cache write and attention kernel of the pruned layers
)

_seconds = dict.fromkeys(SECTIONS, 0.0)
_calls = dict.fromkeys(SECTIONS, 0)

F = TypeVar("F", bound=Callable)


def timed(section: str) -> Callable[[F], F]:
    """Decorator: count ``function``'s wall time under ``section`` when profiling is on."""
    if section not in _seconds:
        raise ValueError(f"unknown profiling section {section!r}; expected one of {SECTIONS}")

    def wrap(function: F) -> F:
        if not ENABLED:
            return function

        @functools.wraps(function)
        def timed_function(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _seconds[section] += time.perf_counter() - started
                _calls[section] += 1

        return timed_function  # type: ignore[return-value]

    return wrap


def snapshot(reset: bool = True) -> dict[str, dict[str, float]]:
    """Seconds and calls per section in this process since the last reset."""
    result = {s: {"seconds": _seconds[s], "calls": _calls[s]} for s in SECTIONS}
    if reset:
        for section in SECTIONS:
            _seconds[section], _calls[section] = 0.0, 0
    return result
