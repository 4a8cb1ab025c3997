"""OPT with probe pruning, on top of vLLM's OPTForCausalLM.

Module tree and parameter names are vLLM's, so weight loading is inherited.
With pruning on, the decoder layers that are not skipped become
:class:`ProbePruningOPTDecoderLayer` (see llama.py, which this mirrors).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.opt import OPTDecoderLayer, OPTForCausalLM

from vllm_pp.integration.models.base import ProbePruningModelMixin, add_pruned_blocks
from vllm_pp.observability.profiling import timed
from vllm_pp.runtime.attention import StepAttention
from vllm_pp.runtime.pruning import ProbePruning


@timed("q/k/v projection")
def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    qkv, _ = attn.qkv_proj(x)
    return qkv.chunk(chunks=3, dim=-1)


@timed("attention")
def _attend(attn, pruning: ProbePruning, q, k, v) -> StepAttention:
    """KV-cache write of every head; the step's attention."""
    return pruning.attend(attn.attn, q, k, v, head_dim=attn.head_dim, scale=attn.scaling)


class ProbePruningOPTDecoderLayer(OPTDecoderLayer):
    """An OPT decoder layer whose attention output and MLP run pruned."""

    def attach(self, pruning: ProbePruning, layer_index: int) -> None:
        attn = self.self_attn
        self.pruning = pruning
        self.attention_pruner, self.mlp_pruner = add_pruned_blocks(
            pruning, layer_index,
            output_projection=attn.out_proj, head_dim=attn.head_dim, num_kv_heads=attn.attn.num_kv_heads,
            mlp_input=self.fc1, act_fn=self.activation_fn, mlp_output=self.fc2, gated=False,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # OPTDecoderLayer's forward, with both blocks through their pruners.
        residual = hidden_states
        x = self.self_attn_layer_norm(hidden_states) if self.do_layer_norm_before else hidden_states
        heads = _attend(self.self_attn, self.pruning, *_qkv(self.self_attn, x))
        hidden_states = residual + self.attention_pruner.run(residual, heads)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        x = self.final_layer_norm(hidden_states) if self.do_layer_norm_before else hidden_states
        hidden_states = residual + self.mlp_pruner.run(residual, x)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class ProbePruningOPTForCausalLM(ProbePruningModelMixin, OPTForCausalLM):
    """vLLM's OPTForCausalLM, pruned per step when probe pruning is on."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        decoder = self.model.decoder
        self._attach_probe_pruning(
            vllm_config, decoder.layers, decoder.start_layer, decoder.end_layer, ProbePruningOPTDecoderLayer
        )
