"""Starting and stopping vLLM engines in tests.

Engine start-up costs ~25-50 s here, so tests share engines through module- or
session-scoped fixtures built with :func:`vllm_engine`.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from vllm_pp.offline import environ

if TYPE_CHECKING:
    from vllm import LLM

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
def vllm_engine(
    model: Path, *, plugin: bool = True, in_process: bool = False, **kwargs
) -> Iterator["LLM"]:
    """An ``LLM`` on ``model``.

    ``plugin=False`` starts vanilla vLLM (VLLM_PLUGINS=""): its engine must run
    in other processes, since this one has loaded the plugin. ``in_process``
    runs the engine core and the worker in this process, which starts ~30 s
    faster (no process spawns) and needs the plugin; with tensor parallelism the
    workers still run in their own processes (mp) or Ray actors.
    """
    from vllm import LLM

    settings = {**ENGINE_DEFAULTS, **kwargs}
    env = {} if plugin else {"VLLM_PLUGINS": ""}
    if in_process:
        assert plugin
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if settings.get("tensor_parallel_size", 1) > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(i) for i in range(settings["tensor_parallel_size"])
        )
    # Workers are spawned during construction and inherit this environment.
    with environ(**env):
        llm = LLM(model=str(model), **settings)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
