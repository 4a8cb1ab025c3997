"""Starting and stopping vLLM engines in tests.

Engine start-up costs ~25-50 s here, so tests share engines through module- or
session-scoped fixtures built with :func:`vllm_engine`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Iterator

TESTS_DIR = Path(__file__).resolve().parent

# Small, deterministic settings: fp32 for exact comparisons, eager for both the
# vanilla and the plugin engine, no prefix caching (a cached prefix would carry
# another step's pruning decisions).
ENGINE_DEFAULTS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=512,
    max_num_seqs=8,
    max_num_batched_tokens=2048,
    enable_prefix_caching=False,
    seed=0,
)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def vllm_engine(model: Path, *, plugin: bool = True, **kwargs) -> Iterator["LLM"]:
    """An ``LLM`` on ``model``; ``plugin=False`` starts vanilla vLLM (VLLM_PLUGINS="")."""
    from vllm import LLM

    settings = {**ENGINE_DEFAULTS, **kwargs}
    env = {} if plugin else {"VLLM_PLUGINS": ""}
    if settings.get("tensor_parallel_size", 1) > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(i) for i in range(settings["tensor_parallel_size"])
        )
    # Workers are spawned during construction and inherit this environment.
    with _environ(**env):
        llm = LLM(model=str(model), **settings)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
