"""Packed kept-unit weights and the block adapters (vllm_pp/runtime/) against plain gathers, no vLLM."""

import types

import pytest
import torch
import torch.nn.functional as F

from vllm_pp.algorithm.selection import kept_heads_to_channels
from vllm_pp.runtime.attention import AllHeadsAttention
from vllm_pp.runtime.blocks import OutputProjection, PrunedAttentionOutput, PrunedMLP
from vllm_pp.runtime.execution import GatheredUnits, PackedUnits


class _Linear(types.SimpleNamespace):
    """Just what the adapters read from a vLLM linear: weight, bias, the (output, bias) call."""

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias), None


def _linear(weight: torch.Tensor, bias=None) -> _Linear:
    return _Linear(weight=torch.nn.Parameter(weight.clone(), requires_grad=False), bias=bias)


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


@pytest.mark.parametrize("capturable", [False, True], ids=["swap", "gather-in-place"])
def test_packed_units_hold_the_kept_rows(capturable, device):
    unit_rows, num_units, keep = 3, 10, 6
    source = torch.randn(2, num_units * unit_rows, 5).to(device)
    packed = PackedUnits([source], unit_rows, capturable=capturable)
    for kept in _decisions(num_units, keep, steps=8, seed=0):
        kept = kept.to(device)
        packed.load(kept)
        rows = kept_heads_to_channels(kept, unit_rows)
        # Every kept unit is in exactly one slot, with its own rows.
        assert sorted(packed.slot_units.tolist()) == kept.tolist()
        assert torch.equal(packed.packed[0], source[:, packed.slot_rows])
        assert packed.held.nonzero().squeeze(1).tolist() == kept.tolist()
        # slot_rows names the kept units' rows, each once.
        assert sorted(packed.slot_rows.tolist()) == rows.tolist()


def test_gated_mlp_and_attention_output_equal_masked_dense_blocks(device):
    hidden, width, heads, head_dim = 8, 12, 4, 2
    gate_up = _linear(torch.randn(2 * width, hidden).to(device))
    down = _linear(torch.randn(hidden, width).to(device), bias=torch.randn(hidden).to(device))
    o_proj = _linear(torch.randn(hidden, heads * head_dim).to(device))
    dense_down, dense_o = down.weight.clone(), o_proj.weight.clone()

    def act(gate_up_out):  # SiluAndMul
        gate, up = gate_up_out.chunk(2, dim=-1)
        return F.silu(gate) * up

    mlp = PrunedMLP(gate_up, act, OutputProjection(down), gated=True)
    attention = PrunedAttentionOutput(OutputProjection(o_proj), head_dim)
    x = torch.randn(5, hidden).to(device)
    dense_output = mlp.dense(x)
    mlp.prepare()
    attention.prepare()
    # The parameters keep their values and shapes; only their memory layout changed.
    assert torch.equal(down.weight, dense_down) and down.weight.t().is_contiguous()
    torch.testing.assert_close(mlp.dense(x), dense_output)
    heads_out = torch.randn(5, heads * head_dim).to(device)
    correction = torch.randn(hidden).to(device)
    for kept, kept_heads in zip(_decisions(width, 7, 6, seed=1), _decisions(heads, 2, 6, seed=2)):
        kept, kept_heads = kept.to(device), kept_heads.to(device)
        output, intermediate, channels = mlp.pruned(x, kept, correction)
        mask = torch.zeros(width, device=device)
        mask[kept] = 1.0
        full = act(F.linear(x, gate_up.weight))
        torch.testing.assert_close(output, F.linear(full * mask, dense_down) + correction + down.bias)
        assert sorted(channels.tolist()) == kept.tolist()
        torch.testing.assert_close(intermediate, full[:, channels])
        probe_rows = torch.tensor([0, 3], device=device)
        torch.testing.assert_close(mlp.probe(x, probe_rows), full[probe_rows])

        output, kept_out, channels = attention.pruned(AllHeadsAttention(heads_out), kept_heads, None)
        kept_channels = kept_heads_to_channels(kept_heads, head_dim)
        torch.testing.assert_close(output, heads_out[:, kept_channels] @ dense_o[:, kept_channels].t())
        assert sorted(channels.tolist()) == kept_channels.tolist()
        assert torch.equal(kept_out, heads_out[:, channels])


def test_plain_mlp_with_bias_equals_masked_dense_block(device):
    hidden, width = 6, 9
    fc1 = _linear(torch.randn(width, hidden).to(device), bias=torch.randn(width).to(device))
    fc2 = _linear(torch.randn(hidden, width).to(device), bias=torch.randn(hidden).to(device))
    dense_fc2 = fc2.weight.clone()
    mlp = PrunedMLP(fc1, torch.relu, OutputProjection(fc2), gated=False)
    mlp.prepare()
    x = torch.randn(3, hidden).to(device)
    for kept in _decisions(width, 4, 6, seed=3):
        kept = kept.to(device)
        output, intermediate, channels = mlp.pruned(x, kept, None)
        full = torch.relu(F.linear(x, fc1.weight, fc1.bias))
        mask = torch.zeros(width, device=device)
        mask[kept] = 1.0
        torch.testing.assert_close(output, F.linear(full * mask, dense_fc2, fc2.bias))
        assert sorted(channels.tolist()) == kept.tolist()
        torch.testing.assert_close(intermediate, full[:, channels])


def test_output_projection_sums_ranks_before_the_bias():
    """Under TP each rank holds a partial sum: correction joins it, the bias comes once after."""
    linear = _linear(torch.randn(4, 6), bias=torch.randn(4))
    partial, correction = torch.randn(2, 4), torch.randn(4)
    summed = []
    output = OutputProjection(linear, all_reduce=lambda t: summed.append(t.clone()) or 2 * t).finish(partial, correction)
    torch.testing.assert_close(summed[0], partial + correction)
    torch.testing.assert_close(output, 2 * (partial + correction) + linear.bias)
    linear.skip_bias_add = True  # vLLM then returns the bias to its caller instead
    torch.testing.assert_close(OutputProjection(linear).finish(partial, None), partial)


def test_gathered_units_compute_what_packed_units_do(device):
    """The GEMMs that read kept rows in place (Triton) against the packed copies, through a decision
    sequence; a gate/up-like source of 2 sections and a transposed down-like source."""
    hidden, width = 24, 40
    generator = torch.Generator().manual_seed(4)
    sources = [torch.randn(2, width, hidden, generator=generator).to(device),
               torch.randn(1, width, hidden, generator=generator).to(device),
               torch.randn(2, width, 1, generator=generator).to(device)]  # a bias
    packed, gathered = PackedUnits(sources, 1), GatheredUnits(sources, 1)
    x = torch.randn(5, hidden, generator=generator).to(device)
    for kept in _decisions(width, 17, 4, seed=5):
        kept = kept.to(device)
        packed.load(kept)
        gathered.load(kept)
        assert gathered.slot_rows.tolist() == kept.tolist()  # ascending slots
        order = packed.slot_rows.argsort()  # packed slots in kept order
        hidden_packed = packed.output_rows(0, x).view(5, 2, -1)[:, :, order].reshape(5, -1)
        torch.testing.assert_close(gathered.output_rows(0, x), hidden_packed, rtol=1e-4, atol=1e-4)
        a = torch.randn(5, kept.numel(), generator=generator).to(device)
        torch.testing.assert_close(gathered.input_rows(1, a), packed.input_rows(1, a[:, order.argsort()]),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gathered.rows_of(2), packed.rows_of(2)[:, order])
