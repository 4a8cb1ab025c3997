"""vLLM engines with the tests' settings, through the project's one engine factory.

Engine start-up costs ~25-50 s here, so tests share engines through module- or
session-scoped fixtures built with :func:`vllm_engine`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from vllm_pp.tools import engine

if TYPE_CHECKING:
    from vllm import LLM

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
def vllm_engine(model: Path, *, plugin: bool = True, in_process: bool = False, **kwargs) -> Iterator["LLM"]:
    """An ``LLM`` on ``model`` with the test settings (``kwargs`` override them).

    ``plugin=False`` starts vanilla vLLM in other processes; ``in_process``
    runs the engine core and the worker in this process (vllm_pp/tools/engine.py).
    """
    with engine.vllm_engine(model, plugin=plugin, in_process=in_process, **{**ENGINE_DEFAULTS, **kwargs}) as llm:
        yield llm
