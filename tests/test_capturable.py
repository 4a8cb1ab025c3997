"""The capturable step path: no host synchronisation anywhere in a pruned step.

On an accelerator a synchronisation stalls the launch queue and makes a CUDA
graph impossible; on the CPU it costs nothing, so these tests make every
synchronising call raise and run pruned steps of PP (deciding, reusing,
updating its history) through the runtime with ``capturable=True``. The same
steps without it must give the same decisions and outputs.
"""

from __future__ import annotations

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
    for query_lens, context_lens in steps:
        inputs = step_inputs(SHAPE, query_lens, context_lens, generator, dtype=torch.float32)
        outputs.append(stack.step(inputs))
        decisions.append({p.block: p.adapter.packed.kept for p in stack.pruning._pruners})
    return outputs, decisions


def _stack(capturable: bool, reuse: int = 2) -> BlockStack:
    config = ProbePruningConfig.from_dict({
        "ratio": 0.4, "skip_layers": list(SHAPE.skip_layers), "channel_multiple": 8,
        "reuse_decode_steps": reuse, "history": {"position_bucket_size": 16},
    })
    return BlockStack(SHAPE, config, capturable=capturable, dtype=torch.float32)


@pytest.mark.parametrize("reuse", [0, 2])
def test_capturable_steps_never_synchronise_and_match_the_cpu_path(reuse):
    reference = _stack(capturable=False, reuse=reuse)
    reference_outputs, reference_decisions = _run(reference)
    stack = _stack(capturable=True, reuse=reuse)
    with no_synchronisation():
        outputs, decisions = _run(stack)
    for got, want in zip(outputs, reference_outputs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # packed slot order differs: GEMM sums reorder
    for got, want in zip(decisions, reference_decisions):
        assert {b: k.tolist() for b, k in got.items()} == {b: k.tolist() for b, k in want.items()}
    # Every history row updated (capturable) or only the step's rows: the same history.
    for block, rows in reference.pruning.method.history.items():
        torch.testing.assert_close(stack.pruning.method.history[block], rows, rtol=1e-4, atol=1e-6)
    assert stack.pruning.method.skipped_history_rows == 0


def test_the_check_catches_the_synchronising_path():
    """Not vacuous: the CPU path (swaps, the step's distinct history rows) synchronises."""
    stack = _stack(capturable=False)
    with no_synchronisation(), pytest.raises(SynchronisingCall):
        _run(stack)
