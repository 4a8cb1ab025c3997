"""Pruning methods, each one small class behind :class:`~vllm_pp.methods.base.PruningMethod`.

Every module of this package is imported once and each subclass that sets a
``name`` is a built-in method under that name; an out-of-tree method is named
``package.module:ClassName``.
"""

from __future__ import annotations

import importlib
import pkgutil

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods.base import PrunableBlock, PruningMethod, WorkerInfo


def _builtin_methods() -> dict[str, type[PruningMethod]]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[PruningMethod]] = {}
    pending = [PruningMethod]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{__name__}.") and "name" in cls.__dict__ and cls.name:
            found[cls.name] = cls
    return found


BUILTIN = _builtin_methods()


def method_class(name: str) -> type[PruningMethod]:
    """Resolve a built-in name or an out-of-tree 'package.module:ClassName'."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, colon, class_name = name.partition(":")
    if not colon:
        raise ProbePruningConfigError(
            f"probe_pruning.method={name!r} is invalid: expected one of "
            f"{', '.join(sorted(BUILTIN))}, or 'package.module:ClassName'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError as err:
        raise ProbePruningConfigError(
            f"probe_pruning.method={name!r} is invalid: cannot import it ({err})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise ProbePruningConfigError(
            f"probe_pruning.method={name!r} is invalid: {class_name!r} in "
            f"{module_name!r} is not a PruningMethod subclass"
        )
    return cls


def pruning_enabled(config: ProbePruningConfig) -> bool:
    """Whether the model runs the pruned layers at all (otherwise it is vanilla vLLM)."""
    return config.ratio > 0.0 or method_class(config.method).active_at_ratio_zero


def build_method(
    config: ProbePruningConfig, blocks: list[PrunableBlock], worker: WorkerInfo
) -> PruningMethod:
    return method_class(config.method)(config, blocks, worker)
