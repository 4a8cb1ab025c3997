"""LLaMA (MHA and GQA) with probe pruning, on top of vLLM's LlamaForCausalLM.

Module tree and parameter names are vLLM's, so weight loading is inherited.
With pruning on, the decoder layers that are not skipped become
:class:`ProbePruningLlamaDecoderLayer`, whose attention output and MLP run on
the kept heads and channels chosen each step by the configured method.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from vllm_pp.integration.models.base import ProbePruningModelMixin, add_pruned_blocks
from vllm_pp.observability.profiling import timed
from vllm_pp.runtime.attention import StepAttention
from vllm_pp.runtime.pruning import ProbePruning


@timed("q/k/v projection")
def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, _ = attn.qkv_proj(x)
    return qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)


@timed("attention")
def _attend(attn, pruning: ProbePruning, positions: torch.Tensor, q, k, v) -> StepAttention:
    """Rotary and KV-cache write of every head; the step's attention."""
    q, k = attn.rotary_emb(positions, q, k)
    return pruning.attend(attn.attn, q, k, v, head_dim=attn.head_dim, scale=attn.scaling)


class ProbePruningLlamaDecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer whose attention output and MLP run pruned."""

    def attach(self, pruning: ProbePruning, layer_index: int) -> None:
        attn, mlp = self.self_attn, self.mlp
        self.pruning = pruning
        self.attention_pruner, self.mlp_pruner = add_pruned_blocks(
            pruning, layer_index,
            output_projection=attn.o_proj, head_dim=attn.head_dim, num_kv_heads=attn.attn.num_kv_heads,
            mlp_input=mlp.gate_up_proj, act_fn=mlp.act_fn, mlp_output=mlp.down_proj, gated=True,
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # LlamaDecoderLayer's fused-residual convention: `residual` after each
        # norm is the residual stream entering the block (it ranks the probe).
        if residual is None:
            residual = hidden_states
            x = self.input_layernorm(hidden_states)
        else:
            x, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._attention_block(positions, x, residual)
        x, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp_pruner.run(residual, x)
        return hidden_states, residual

    def _attention_block(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        heads = _attend(self.self_attn, self.pruning, positions, *_qkv(self.self_attn, x))
        return self.attention_pruner.run(residual, heads)


class ProbePruningLlamaForCausalLM(ProbePruningModelMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM, pruned per step when probe pruning is on."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model = self.model
        self._attach_probe_pruning(
            vllm_config, model.layers, model.start_layer, model.end_layer, ProbePruningLlamaDecoderLayer
        )
