"""The capturable step path: no host synchronisation anywhere in a pruned step.

On an accelerator a synchronisation stalls the launch queue and makes a CUDA
graph impossible; on the CPU it costs nothing, so these tests make every
synchronising call raise and run pruned steps of PP (deciding, reusing,
updating its history) through the runtime with ``capturable=True``. The same
steps without it must give the same decisions and outputs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from vllm_pp.config import ProbePruningConfig
from vllm_pp.tools.block_stack import BlockStack, StackShape, step_inputs, synchronisations

SHAPE = StackShape(hidden=64, heads=4, head_dim=16, intermediate=128, layers=4, skip_layers=(0,),
                   max_model_len=256)
# (query lens, context lens) of each step: prefill chunks beside decode tokens, then
# decode-only steps (decisions reused) and a new prefill.
STEPS = [([20, 13], [0, 0]), ([1, 1], [20, 13]), ([1, 1], [21, 14]), ([1, 1], [22, 15]),
         ([1, 1, 40], [23, 16, 0]), ([1, 1, 1], [24, 17, 40]), ([1, 1, 1], [25, 18, 41])]


class SynchronisingCall(AssertionError):
    pass


def no_synchronisation():
    """Every call that waits for the device raises while the block runs."""

    def refuse(name: str) -> None:
        raise SynchronisingCall(f"{name} synchronises with the device")

    return synchronisations(refuse)


def _run(stack: BlockStack, steps=STEPS) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(1)
    outputs, decisions = [], []
    device = stack.layers[0].o_proj.weight.device
    for query_lens, context_lens in steps:
        inputs = step_inputs(SHAPE, query_lens, context_lens, generator, device=device, dtype=torch.float32)
        outputs.append(stack.step(inputs))
        decisions.append({p.block: p.adapter.packed.kept for p in stack.pruning._pruners})
    return outputs, decisions


def _stack(capturable: bool, reuse: int = 2, device: torch.device = torch.device("cpu"),
           gathered: bool = False) -> BlockStack:
    config = ProbePruningConfig.from_dict({
        "ratio": 0.4, "skip_layers": list(SHAPE.skip_layers), "channel_multiple": 8,
        "reuse_decode_steps": reuse, "history": {"position_bucket_size": 16},
    })
    return BlockStack(SHAPE, config, capturable=capturable, gathered=gathered, device=device, dtype=torch.float32)


@pytest.mark.parametrize("reuse", [0, 2])
def test_capturable_steps_never_synchronise_and_match_the_synchronising_path(reuse, device):
    reference = _stack(capturable=False, reuse=reuse, device=device)  # synchronises: allowed here
    reference_outputs, reference_decisions = _run(reference)
    stack = _stack(capturable=True, reuse=reuse, device=device)
    with no_synchronisation(), cuda_sync_debug_error(device):
        outputs, decisions = _run(stack)
    for got, want in zip(outputs, reference_outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # packed slot order differs: GEMM sums reorder
    for got, want in zip(decisions, reference_decisions):
        assert {b: k.tolist() for b, k in got.items()} == {b: k.tolist() for b, k in want.items()}
    # Every history row updated (capturable) or only the step's rows: the same history.
    for block, rows in reference.pruning.method.history.items():
        torch.testing.assert_close(stack.pruning.method.history[block], rows, rtol=1e-4, atol=1e-6)
    assert stack.pruning.method.skipped_history_rows == 0


@contextlib.contextmanager
def cuda_sync_debug_error(device: torch.device):
    """On CUDA, torch's own check as well: a synchronising call raises."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_captured_step_replays_what_eager_steps_compute(device):
    """CUDA only: a whole PP step (decision, packing, GEMMs, history update) captured once and
    replayed on new inputs gives what an eager twin computes."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (run with --device cuda)")
    eager, captured = (_stack(capturable=True, reuse=0, device=device) for _ in range(2))
    generator = torch.Generator().manual_seed(3)
    static = step_inputs(SHAPE, [30, 1, 1], [0, 40, 41], generator, device=device, dtype=torch.float32)
    for stack in (eager, captured):  # the same warm-up steps: decisions and history alike
        for _ in range(3):
            stack.step(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = captured.step(static)
    for seed in range(3):
        fresh = step_inputs(SHAPE, [30, 1, 1], [0, 40, 41], torch.Generator().manual_seed(10 + seed),
                            device=device, dtype=torch.float32)
        static.hidden.copy_(fresh.hidden)
        static.attention.copy_(fresh.attention)
        graph.replay()
        torch.testing.assert_close(output, eager.step(static), rtol=1e-4, atol=1e-4)
    for block, rows in eager.pruning.method.history.items():
        torch.testing.assert_close(captured.pruning.method.history[block], rows, rtol=1e-4, atol=1e-6)


def test_gathered_weights_give_the_packed_path_s_steps(device):
    """The GEMMs reading kept rows in place (Triton): the same decisions and outputs as packed
    copies. On CUDA without any synchronisation (on the CPU the interpreter runs the kernels)."""
    packed = _stack(capturable=True, device=device)
    packed_outputs, packed_decisions = _run(packed)
    gathered = _stack(capturable=True, device=device, gathered=True)
    checks = (no_synchronisation(), cuda_sync_debug_error(device)) if device.type == "cuda" else ()
    with contextlib.ExitStack() as stack:
        for check in checks:
            stack.enter_context(check)
        outputs, decisions = _run(gathered)
    for got, want in zip(outputs, packed_outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(decisions, packed_decisions):
        assert {b: k.tolist() for b, k in got.items()} == {b: k.tolist() for b, k in want.items()}
    assert 0 < gathered.extra_weight_bytes() < packed.extra_weight_bytes() / 10  # row indices, no copies


def test_the_check_catches_the_synchronising_path():
    """Not vacuous: the CPU path (swaps, the step's distinct history rows) synchronises."""
    stack = _stack(capturable=False)
    with no_synchronisation(), pytest.raises(SynchronisingCall):
        _run(stack)
