"""Packed kept-unit weights (vllm_pp/execution.py) against plain gathers, no vLLM engine."""

import types

import torch
import torch.nn.functional as F

from vllm_pp import execution
from vllm_pp.attention import AllHeadsAttention


def _row_parallel(weight: torch.Tensor, bias=None):
    """Just what execution reads from a vLLM RowParallelLinear (TP 1)."""
    return types.SimpleNamespace(
        weight=torch.nn.Parameter(weight.clone(), requires_grad=False),
        bias=bias, skip_bias_add=False, tp_size=1, reduce_results=True,
        input_size_per_partition=weight.shape[1],
    )


def _column_parallel(weight: torch.Tensor, bias=None):
    return types.SimpleNamespace(weight=torch.nn.Parameter(weight.clone(), requires_grad=False), bias=bias)


def _decisions(num_units: int, keep: int, steps: int, seed: int):
    """Kept sets that overlap step to step (a few units swap), then a fresh one, then a repeat."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(num_units, generator=generator)[:keep].sort().values
    out = [kept]
    for _ in range(steps):
        pruned = torch.tensor(sorted(set(range(num_units)) - set(kept.tolist())))
        swap = torch.randint(0, 3, (), generator=generator).item()
        leave = torch.randperm(keep, generator=generator)[:swap]
        enter = pruned[torch.randperm(pruned.numel(), generator=generator)[:swap]]
        stay = torch.ones(keep, dtype=torch.bool)
        stay[leave] = False
        kept = torch.cat([kept[stay], enter]).sort().values
        out.append(kept)
    out.append(torch.randperm(num_units, generator=generator)[:keep].sort().values)
    out.append(out[-1])  # the same decision object again: nothing moves
    return out


def test_packed_units_hold_the_kept_rows():
    unit_rows, num_units, keep = 3, 10, 6
    source = torch.randn(2, num_units * unit_rows, 5)
    packed = execution.PackedUnits([source], unit_rows)
    for kept in _decisions(num_units, keep, steps=8, seed=0):
        packed.load(kept)
        rows = execution.kept_heads_to_channels(kept, unit_rows)
        # Every kept unit is in exactly one slot, with its own rows.
        assert sorted(packed.slot_units.tolist()) == kept.tolist()
        assert torch.equal(packed.packed[0], source[:, packed.slot_rows])
        assert packed.held.nonzero().squeeze(1).tolist() == kept.tolist()
        # slot_rows names the kept units' rows, each once.
        assert sorted(packed.slot_rows.tolist()) == rows.tolist()


def test_gated_mlp_and_attention_output_equal_masked_dense_blocks():
    hidden, width, heads, head_dim = 8, 12, 4, 2
    gate_up = _column_parallel(torch.randn(2 * width, hidden))
    down = _row_parallel(torch.randn(hidden, width), bias=torch.randn(hidden))
    o_proj = _row_parallel(torch.randn(hidden, heads * head_dim))
    dense_down, dense_o = down.weight.clone(), o_proj.weight.clone()
    mlp = execution.pack_gated_mlp(gate_up, down)
    attention = execution.pack_attention_output(o_proj, head_dim)
    # The parameters keep their values and shapes; only their memory layout changed.
    assert torch.equal(down.weight, dense_down) and down.weight.t().is_contiguous()

    def act(gate_up_out):  # SiluAndMul
        gate, up = gate_up_out.chunk(2, dim=-1)
        return F.silu(gate) * up

    x = torch.randn(5, hidden)
    heads_out = torch.randn(5, heads * head_dim)
    correction = torch.randn(hidden)
    for kept, kept_heads in zip(_decisions(width, 7, 6, seed=1), _decisions(heads, 2, 6, seed=2)):
        output, intermediate, channels = execution.gated_mlp(mlp, act, down, x, kept, correction)
        mask = torch.zeros(width)
        mask[kept] = 1.0
        full = act(F.linear(x, gate_up.weight))
        torch.testing.assert_close(output, F.linear(full * mask, dense_down) + correction + down.bias)
        assert sorted(channels.tolist()) == kept.tolist()
        torch.testing.assert_close(intermediate, full[:, channels])

        output, kept_out, channels = execution.attention_output(
            attention, o_proj, AllHeadsAttention(heads_out), kept_heads
        )
        kept_channels = execution.kept_heads_to_channels(kept_heads, head_dim)
        torch.testing.assert_close(output, heads_out[:, kept_channels] @ dense_o[:, kept_channels].t())
        assert sorted(channels.tolist()) == kept_channels.tolist()
        assert torch.equal(kept_out, heads_out[:, channels])


def test_plain_mlp_with_bias_equals_masked_dense_block():
    hidden, width = 6, 9
    fc1 = _column_parallel(torch.randn(width, hidden), bias=torch.randn(width))
    fc2 = _row_parallel(torch.randn(hidden, width), bias=torch.randn(hidden))
    dense_fc2 = fc2.weight.clone()
    packed = execution.pack_plain_mlp(fc1, fc2)
    x = torch.randn(3, hidden)
    for kept in _decisions(width, 4, 6, seed=3):
        output, intermediate, channels = execution.plain_mlp(packed, torch.relu, fc2, x, kept)
        full = torch.relu(F.linear(x, fc1.weight, fc1.bias))
        mask = torch.zeros(width)
        mask[kept] = 1.0
        torch.testing.assert_close(output, F.linear(full * mask, dense_fc2, fc2.bias))
        assert sorted(channels.tolist()) == kept.tolist()
        torch.testing.assert_close(intermediate, full[:, channels])
