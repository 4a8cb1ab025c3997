"""A stack of decoder-layer blocks with random weights, pruned by the runtime as the vLLM models are.

Torch only: it drives :class:`vllm_pp.runtime.pruning.ProbePruning` and the
block adapters exactly as vllm_pp/integration/models/ does (one attention-
output block and one MLP block per layer, each through its pruner, the step's
metadata first and ``end_step`` last), on any device. The attention itself is
a stand-in, one given output per step: with the KV cache written for every
head it costs the same with and without pruning. The RMS norms are left out
(they cost the same too), and each block's input is the residual stream.

:func:`synchronisations` reports every call that waits for the device.
Used by benchmarks/gpu_step.py and by the tests of the capturable step path.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods import pruning_enabled
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.runtime.attention import AllHeadsAttention
from vllm_pp.runtime.blocks import OutputProjection, PrunedAttentionOutput, PrunedMLP
from vllm_pp.runtime.pruning import BlockPruner, ProbePruning


@dataclass(frozen=True)
class StackShape:
    """Widths of a LLaMA-like stack (defaults: LLaMA-2-7B's)."""

    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    intermediate: int = 11008
    layers: int = 32
    skip_layers: tuple[int, ...] = (0, 1, 2)
    max_model_len: int = 4096


class Linear(torch.nn.Module):
    """A weight ``[out, in]`` with vLLM's linear call convention: ``(output, bias)``."""

    def __init__(self, out_features: int, in_features: int, generator: torch.Generator, **tensor):
        super().__init__()
        # Drawn on the generator's device (a 7B-width stack draws billions of values).
        weight = torch.randn(out_features, in_features, generator=generator, device=generator.device)
        self.weight = torch.nn.Parameter((weight / in_features**0.5).to(**tensor), requires_grad=False)
        self.bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I], as vLLM's SiluAndMul
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class Layer:
    o_proj: Linear
    gate_up: Linear
    down: Linear
    attention: BlockPruner | None = None  # None: a skipped (dense) layer
    mlp: BlockPruner | None = None


@dataclass
class StepInputs:
    """One step: the residual stream entering the stack, the attention stand-in, the batch."""

    hidden: torch.Tensor  # [T, hidden]
    attention: torch.Tensor  # [T, heads * head_dim], every layer's attention output
    metadata: object  # num_actual_tokens, max_query_len, query_start_loc, seq_lens (vLLM's fields)
    positions: torch.Tensor  # [T]


def step_inputs(
    shape: StackShape, query_lens: list[int], context_lens: list[int], generator: torch.Generator, **tensor
) -> StepInputs:
    """A step of requests with ``query_lens`` new tokens after ``context_lens`` cached ones."""
    device = tensor.get("device")
    num_tokens = sum(query_lens)
    starts = [0]
    for length in query_lens:
        starts.append(starts[-1] + length)
    metadata = type("StepMetadata", (), {})()
    metadata.num_actual_tokens = num_tokens
    metadata.max_query_len = max(query_lens)
    metadata.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    metadata.seq_lens = torch.tensor([c + q for c, q in zip(context_lens, query_lens)], dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(context_lens, query_lens)]).to(device)
    hidden = torch.randn(num_tokens, shape.hidden, generator=generator).to(**tensor)
    attention = torch.randn(num_tokens, shape.heads * shape.head_dim, generator=generator).to(**tensor)
    return StepInputs(hidden, attention, metadata, positions)


class BlockStack:
    """``shape.layers`` layers of o_proj and MLP weights, pruned by ``config`` through the runtime
    (with pruning off, every layer runs dense)."""

    def __init__(
        self, shape: StackShape, config: ProbePruningConfig, *, capturable: bool | None = None,
        gathered: bool = False, seed: int = 0, **tensor,
    ):
        generator = torch.Generator(device=tensor.get("device", "cpu")).manual_seed(seed)
        self.shape = shape
        worker = WorkerInfo(num_layers=shape.layers, tp_rank=0, tp_size=1, max_model_len=shape.max_model_len)
        self.pruning = ProbePruning(config, worker, labels={}, capturable=capturable, gathered=gathered)
        self.layers: list[Layer] = []
        attention_width = shape.heads * shape.head_dim
        for index in range(shape.layers):
            layer = Layer(
                o_proj=Linear(shape.hidden, attention_width, generator, **tensor),
                gate_up=Linear(2 * shape.intermediate, shape.hidden, generator, **tensor),
                down=Linear(shape.hidden, shape.intermediate, generator, **tensor),
            )
            if pruning_enabled(config) and self.pruning.is_pruned(index):
                layer.attention = self.pruning.add_block(
                    PrunableBlock(index, "attention", attention_width, shape.head_dim),
                    PrunedAttentionOutput(OutputProjection(layer.o_proj), shape.head_dim),
                )
                layer.mlp = self.pruning.add_block(
                    PrunableBlock(index, "mlp", shape.intermediate),
                    PrunedMLP(layer.gate_up, silu_and_mul, OutputProjection(layer.down), gated=True),
                )
            self.layers.append(layer)
        self.pruning.build()
        self.pruning.prepare()

    def step(self, inputs: StepInputs) -> torch.Tensor:
        """One pruned step over the stack: the residual stream leaving it, ``[T, hidden]``."""
        pruning = self.pruning
        pruning.begin_step(inputs.metadata, inputs.positions)
        hidden = inputs.hidden
        for layer in self.layers:
            heads = AllHeadsAttention(inputs.attention)
            if layer.attention is None:
                hidden = hidden + self._dense_attention(layer, heads)
                hidden = hidden + self._dense_mlp(layer, hidden)
            else:
                hidden = hidden + layer.attention.run(hidden, heads)
                hidden = hidden + layer.mlp.run(hidden, hidden)
        pruning.end_step()
        return hidden

    def dense_step(self, inputs: StepInputs) -> torch.Tensor:
        """The same step with every unit, as vLLM runs it (no pruning machinery at all)."""
        hidden = inputs.hidden
        for layer in self.layers:
            hidden = hidden + self._dense_attention(layer, AllHeadsAttention(inputs.attention))
            hidden = hidden + self._dense_mlp(layer, hidden)
        return hidden

    @staticmethod
    def _dense_attention(layer: Layer, heads: AllHeadsAttention) -> torch.Tensor:
        return layer.o_proj(heads.all_heads())[0]

    @staticmethod
    def _dense_mlp(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        return layer.down(silu_and_mul(layer.gate_up(x)[0]))[0]

    def weight_bytes(self) -> int:
        """Bytes of the stack's dense weights (o_proj, gate_up, down of every layer)."""
        return sum(p.nbytes for layer in self.layers for p in (layer.o_proj.weight, layer.gate_up.weight, layer.down.weight))

    def extra_weight_bytes(self) -> int:
        """Bytes the pruned path holds beyond the dense weights (packed copies of kept rows)."""
        return sum(
            pruner.adapter.packed.extra_bytes() for layer in self.layers for pruner in (layer.attention, layer.mlp)
            if pruner is not None and pruner.adapter.packed is not None
        )


# Calls whose result size or value the host must wait for. Boolean-mask
# indexing is checked in Tensor.__getitem__.
SYNCHRONISING_CALLS = (
    (torch, "nonzero"), (torch.Tensor, "nonzero"), (torch, "unique"), (torch.Tensor, "unique"),
    (torch, "masked_select"), (torch.Tensor, "masked_select"), (torch, "bincount"),
    (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__"),
    (torch.Tensor, "__int__"), (torch.Tensor, "__float__"),
)


@contextlib.contextmanager
def synchronisations(on_call: Callable[[str], None]) -> Iterator[None]:
    """Within the block, every call that waits for the device first calls
    ``on_call(its name)`` (which may raise), on any device: on the CPU such a
    call costs nothing, so this is how CPU runs see what would stall a GPU."""

    def reported(name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def call(*args, **kwargs):
            on_call(name)
            return original(*args, **kwargs)
        return call

    get_item = torch.Tensor.__getitem__

    def checked_get_item(self, index):
        indices = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            on_call("boolean-mask indexing")
        return get_item(self, index)

    originals = [(owner, name, getattr(owner, name)) for owner, name in SYNCHRONISING_CALLS]
    try:
        for owner, name, original in originals:
            setattr(owner, name, reported(name, original))
        torch.Tensor.__getitem__ = checked_get_item
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        torch.Tensor.__getitem__ = get_item
