"""Pruning methods, each one small class behind :class:`PruningMethod`."""

from __future__ import annotations

import importlib

from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods.base import PrunableBlock, PruningMethod, WorkerInfo
from vllm_pp.methods.calibration import CalibrationRecorder
from vllm_pp.methods.probe import FullBatchProbing, ProbePruningMethod
from vllm_pp.methods.static import Flap, WandaSp

BUILTIN = {
    "probe": ProbePruningMethod,
    "full-batch": FullBatchProbing,
    "flap": Flap,
    "wanda-sp": WandaSp,
    # Prunes nothing but still runs the pruned-execution path, so it measures
    # that path's overhead.
    "dense": PruningMethod,
    "calibration": CalibrationRecorder,
}


def method_class(name: str) -> type[PruningMethod]:
    """Resolve a built-in name or an out-of-tree 'package.module:ClassName'."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, class_name = name.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise ValueError(
            f"probe_pruning.method={name!r} is invalid: {class_name!r} in "
            f"{module_name!r} is not a PruningMethod subclass"
        )
    return cls


def build_method(
    config: ProbePruningConfig, blocks: list[PrunableBlock], worker: WorkerInfo
) -> PruningMethod:
    return method_class(config.method)(config, blocks, worker)
