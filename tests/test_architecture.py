"""The package's layers: imports point one way, there are no circles, the runtime needs no vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_pp"

# Highest first: a module may import its own layer and the layers below it.
LAYERS = ["tools", "integration", "runtime", "methods", "storage|observability", "algorithm", "config"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every vllm_pp module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm_pp"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vllm_pp"))
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    """Index in LAYERS (0 = highest), None for the package's entry point."""
    part = module.split(".")[1] if module.count(".") else None
    for index, names in enumerate(LAYERS):
        if part in names.split("|"):
            return index
    return None


def test_every_module_sits_in_a_layer():
    assert {m for m in MODULES if _layer(m) is None} == {"vllm_pp"}


def test_imports_point_down_the_layers():
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(module) is not None and _layer(target) < _layer(module)
    ]
    sideways = [  # storage and observability share a level but not their modules
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(module) == _layer(target) and module.split(".")[1] != target.split(".")[1]
    ]
    assert upward + sideways == []


def test_no_import_circles():
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is not a circle of code.
    assert [c for c in circles if not _package_init_only(c)] == []


def _package_init_only(circle: str) -> bool:
    modules = circle.split(" -> ")
    return any(MODULES[m].name == "__init__.py" and all(x.startswith(m) for x in modules) for m in modules)


RUNTIME_WITHOUT_VLLM = r"""
import sys
sys.modules["vllm"] = None  # any `import vllm...` now raises ImportError
import torch
from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods.base import WorkerInfo
from vllm_pp.runtime.blocks import OutputProjection, PrunedAttentionOutput, PrunedMLP
from vllm_pp.runtime.pruning import ProbePruning
from vllm_pp.methods.base import PrunableBlock
import vllm_pp.algorithm.history, vllm_pp.algorithm.probe, vllm_pp.algorithm.scores
import vllm_pp.runtime.attention, vllm_pp.runtime.execution, vllm_pp.runtime.step

# A pruned step of one MLP block, driven as the model classes drive it.
hidden, width = 16, 64
config = ProbePruningConfig(ratio=0.4, skip_layers=[], channel_multiple=8)
pruning = ProbePruning(config, WorkerInfo(num_layers=1, tp_rank=0, tp_size=1, max_model_len=64), {})
fc1, fc2 = torch.nn.Linear(hidden, width), torch.nn.Linear(width, hidden)
linear = lambda module: lambda x: (module(x), None)  # vLLM's (output, bias) convention
mlp = PrunedMLP(type("In", (), {"weight": fc1.weight.data, "bias": fc1.bias.data, "__call__": lambda s, x: linear(fc1)(x)})(),
                torch.relu, OutputProjection(type("Out", (), {"weight": fc2.weight.data, "bias": fc2.bias.data, "__call__": lambda s, x: linear(fc2)(x)})()), gated=False)
pruner = pruning.add_block(PrunableBlock(0, "mlp", width), mlp)
pruning.build()
pruning.prepare()
metadata = type("Metadata", (), {"num_actual_tokens": 5, "max_query_len": 5,
                                 "query_start_loc": torch.tensor([0, 5], dtype=torch.int32),
                                 "seq_lens": torch.tensor([5], dtype=torch.int32)})()
x = torch.randn(5, hidden)
pruning.begin_step(metadata, torch.arange(5))
with torch.no_grad():
    out = pruner.run(x, x)
pruning.end_step()
assert out.shape == (5, hidden) and pruner.stats.pruned == 1, (out.shape, pruner.stats)
assert "vllm" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("runtime ok")
"""


def test_runtime_imports_and_runs_without_vllm():
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_WITHOUT_VLLM], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runtime ok" in result.stdout


def test_the_check_sees_vllm_imports():
    """The check above is not vacuous: a vLLM-facing module does fail there."""
    code = "import sys; sys.modules['vllm'] = None; import vllm_pp.integration.models.llama"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "'vllm' is not a package" in result.stderr
