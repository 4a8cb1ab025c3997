"""Per-model probe-pruning state shared by the LLaMA and OPT model classes."""

from __future__ import annotations

from typing import Callable

import torch

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods import build_method
from vllm_pp.methods.base import PrunableBlock, ProbeFn, PruningMethod, WorkerInfo
from vllm_pp.statistics import model_identity
from vllm_pp.step import StepTracker
from vllm_pp.vllm_compat import check_vllm_version, step_attention_metadata


class BlockPruner:
    """One prunable block bound to its model's method and current step."""

    def __init__(self, block: PrunableBlock, pruning: "ProbePruning"):
        self.block = block
        self.pruning = pruning

    def run(
        self,
        residual: torch.Tensor,
        probe: ProbeFn,
        dense: Callable[[], torch.Tensor],
        pruned: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The block's output: ``dense()`` or ``pruned(kept, correction)``, as the method decides.

        ``residual`` [T, hidden] is the residual stream entering the block;
        ``pruned`` returns (output, output projection's kept input), which feeds
        the method's update.
        """
        batch = self.pruning.steps.batch
        method = self.pruning.method
        # No metadata (warm-up, profiling): dense, which is also the memory worst case.
        kept = None if batch is None else method.decide(self.block, batch, residual, probe)
        if kept is None:
            return dense()
        output, activations = pruned(kept, method.output_correction(self.block, kept))
        method.update(self.block, batch, kept, activations)
        return output


class ProbePruning:
    """Config, step tracker, method and block pruners of one model instance."""

    def __init__(self, config: ProbePruningConfig, vllm_config) -> None:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        self.config = config
        hf_config = vllm_config.model_config.hf_config
        self.worker = WorkerInfo(
            num_layers=hf_config.num_hidden_layers,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
            model_identity=model_identity(hf_config),
            max_model_len=vllm_config.model_config.max_model_len,
        )
        self.steps = StepTracker()
        self.method: PruningMethod | None = None
        self._output_linears: dict[PrunableBlock, torch.nn.Module] = {}
        self._attention_layer_name: str | None = None

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ProbePruning | None":
        """The pruning state for this model, or None when pruning is off."""
        config = ProbePruningConfig.from_additional_config(vllm_config.additional_config)
        if not config.enabled:
            return None
        check_vllm_version()
        _check_supported(config, vllm_config)
        return cls(config, vllm_config)

    def is_pruned(self, layer_index: int) -> bool:
        return layer_index not in self.config.skip_layers

    def add_block(
        self, block: PrunableBlock, output_linear: torch.nn.Module, attention_layer_name: str
    ) -> BlockPruner:
        """Register a block; the returned pruner works once :meth:`build` has run."""
        self._output_linears[block] = output_linear
        self._attention_layer_name = self._attention_layer_name or attention_layer_name
        return BlockPruner(block, self)

    def build(self) -> None:
        """Create the method once every block is known (before weights load)."""
        self.method = build_method(
            self.config, list(self._output_linears), self.worker
        )

    def prepare(self) -> None:
        """After weights load: hand the method the output projections' weights."""
        self.method.prepare({b: lin.weight for b, lin in self._output_linears.items()})

    def begin_step(self, positions: torch.Tensor) -> None:
        self.steps.begin(step_attention_metadata(self._attention_layer_name), positions)


def _check_supported(config: ProbePruningConfig, vllm_config) -> None:
    """Refuse set-ups whose weights or execution the pruned path cannot handle."""
    from vllm.config import CompilationMode, CUDAGraphMode

    num_layers = vllm_config.model_config.hf_config.num_hidden_layers
    if any(i >= num_layers for i in config.skip_layers):
        raise ProbePruningConfigError(
            f"probe_pruning.skip_layers={list(config.skip_layers)} is invalid: the model "
            f"has {num_layers} decoder layers (0..{num_layers - 1})"
        )
    if vllm_config.quant_config is not None:
        raise ProbePruningConfigError(
            f"probe pruning needs unquantized weights; this model is quantized "
            f"({vllm_config.model_config.quantization}): serve it with ratio 0"
        )
    if vllm_config.lora_config is not None:
        raise ProbePruningConfigError(
            "probe pruning does not support LoRA adapters: drop --enable-lora or use ratio 0"
        )
    compilation = vllm_config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        raise ProbePruningConfigError(
            "probe pruning needs eager execution: pass enforce_eager=True (--enforce-eager)"
        )


class ProbePruningModelMixin:
    """Step bookkeeping shared by the LLaMA and OPT causal-LM classes.

    The class using it sets ``self.probe_pruning`` (None when pruning is off).
    """

    probe_pruning: ProbePruning | None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.probe_pruning is not None:
            self.probe_pruning.begin_step(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def process_weights_after_loading(self) -> None:
        # vLLM's loader calls this once, after every layer's own post-load step.
        if self.probe_pruning is not None:
            self.probe_pruning.prepare()
