"""What the LLaMA and OPT model classes share.

Both build vLLM's own model first; with pruning on, each decoder layer that is
not skipped then becomes its pruned subclass (same modules and parameters, a
new forward) and registers its two blocks with the runtime
(vllm_pp/runtime/pruning.py) before weights load. With pruning off nothing is
touched: the model is vLLM's.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable

import torch

from vllm_pp.config import ProbePruningConfig
from vllm_pp.integration.cpu_attention import choose_attention
from vllm_pp.integration.validation import check_supported
from vllm_pp.integration.vllm_compat import (
    check_vllm_version,
    keep_dense_weight,
    row_parallel_all_reduce,
    step_attention_metadata,
    tensor_parallel_position,
)
from vllm_pp.methods import pruning_enabled
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.runtime.blocks import OutputProjection, PrunedAttentionOutput, PrunedMLP
from vllm_pp.runtime.pruning import BlockPruner, ProbePruning
from vllm_pp.storage.statistics import model_identity


def build_probe_pruning(vllm_config) -> ProbePruning | None:
    """This worker's pruning state for the model being built, or None when pruning is off."""
    config = ProbePruningConfig.from_additional_config(vllm_config.additional_config)
    if not pruning_enabled(config):
        return None
    check_vllm_version()
    # Already checked at start-up (validation.py); repeated for configs built without EngineArgs.
    check_supported(config, vllm_config)
    hf_config = vllm_config.model_config.hf_config
    tp_rank, tp_size = tensor_parallel_position()
    worker = WorkerInfo(
        num_layers=hf_config.num_hidden_layers,
        tp_rank=tp_rank,
        tp_size=tp_size,
        model_identity=model_identity(hf_config),
        max_model_len=vllm_config.model_config.max_model_len,
    )
    labels = {
        "model_name": vllm_config.model_config.served_model_name,
        "engine": str(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0),
        "rank": str(tp_rank),
    }
    return ProbePruning(config, worker, labels)


def add_pruned_blocks(
    pruning: ProbePruning,
    layer_index: int,
    *,
    output_projection: torch.nn.Module,
    head_dim: int,
    num_kv_heads: int,
    mlp_input: torch.nn.Module,
    act_fn,
    mlp_output: torch.nn.Module,
    gated: bool,
) -> tuple[BlockPruner, BlockPruner]:
    """Register a decoder layer's attention-output and MLP blocks; their pruners.

    ``output_projection``: o_proj / out_proj; ``num_kv_heads``: the attention's
    KV heads on this rank (vLLM's ``Attention.num_kv_heads``; MHA: its query
    heads); ``mlp_input``, ``mlp_output``: gate_up_proj / fc1 and down_proj / fc2
    (vLLM's parallel linears).
    """
    for linear in (output_projection, mlp_input, mlp_output):
        keep_dense_weight(linear)

    def output(linear: torch.nn.Module) -> OutputProjection:
        return OutputProjection(linear, row_parallel_all_reduce(linear))

    attention = pruning.add_block(
        PrunableBlock(layer_index, "attention", output_projection.input_size_per_partition, head_dim,
                      num_kv_heads),
        PrunedAttentionOutput(output(output_projection), head_dim),
    )
    mlp = pruning.add_block(
        PrunableBlock(layer_index, "mlp", mlp_output.input_size_per_partition),
        PrunedMLP(mlp_input, act_fn, output(mlp_output), gated=gated),
    )
    return attention, mlp


class ProbePruningModelMixin:
    """Pruned layers, step bookkeeping and post-load preparation of a causal LM class.

    The class using it calls :meth:`_attach_probe_pruning` at the end of its
    ``__init__``; ``self.probe_pruning`` is None when pruning is off.
    """

    # Start-up validation recognises the plugin's classes (and their subclasses) by this.
    supports_probe_pruning = True
    probe_pruning: ProbePruning | None

    def _attach_probe_pruning(
        self, vllm_config, layers: Iterable[torch.nn.Module], start: int, end: int, pruned_class: type
    ) -> None:
        """Turn the layers ``start..end`` that are not skipped into ``pruned_class``."""
        pruning = build_probe_pruning(vllm_config)
        self.probe_pruning = pruning
        if pruning is None:
            return
        pruned = []
        for index, layer in enumerate(islice(layers, start, end), start=start):
            if pruning.is_pruned(index):
                layer.__class__ = pruned_class
                layer.attach(pruning, index)
                pruned.append(layer.self_attn.attn)
        # The first pruned layer's attention metadata is the step's (a name, not the
        # module: a module attribute would register it a second time in the tree).
        self._step_layer_name = pruned[0].layer_name if pruned else None
        pruning.build(choose_attention(pruning.config, pruned[0] if pruned else None, pruning.worker.tp_rank))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        pruning = self.probe_pruning
        if pruning is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        name = self._step_layer_name
        pruning.begin_step(step_attention_metadata(name) if name else None, positions)
        hidden_states = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        pruning.end_step()
        return hidden_states

    def process_weights_after_loading(self) -> None:
        # vLLM's loader calls this once, after every layer's own post-load step.
        if self.probe_pruning is not None:
            self.probe_pruning.prepare()


# --pp-history, run on every worker by the engine core's collective_rpc
# (vllm_pp/integration/runtime_patches.py); a model without pruning answers None.

def _pruning(worker) -> ProbePruning | None:
    return getattr(worker.get_model(), "probe_pruning", None)


def probe_pruning_history_rounds(worker) -> list[int] | None:
    """The checkpoint rounds this rank holds."""
    pruning = _pruning(worker)
    return None if pruning is None else pruning.history_rounds()


def load_probe_pruning_history(worker, round_index: int | None) -> None:
    pruning = _pruning(worker)
    if pruning is not None:
        pruning.load_history(round_index)


def checkpoint_probe_pruning_history(worker, round_index: int, wait: bool = False) -> None:
    pruning = _pruning(worker)
    if pruning is not None:
        pruning.checkpoint_history(round_index, wait)
