"""LLaMA (MHA and GQA) with probe pruning, on top of vLLM's LlamaForCausalLM.

Module tree and parameter names are vLLM's, so weight loading is inherited.
With pruning off the model is built exactly as vLLM builds it. With pruning
on, the decoder layers that are not skipped become
:class:`ProbePruningLlamaDecoderLayer`, whose blocks run on the kept heads and
channels chosen each step by the configured method.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from vllm_pp import execution
from vllm_pp.attention import StepAttention
from vllm_pp.methods.base import PrunableBlock
from vllm_pp.profiling import timed
from vllm_pp.pruning import ProbePruning, ProbePruningModelMixin
from vllm_pp.vllm_compat import keep_dense_weight


@timed("q/k/v projection")
def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, _ = attn.qkv_proj(x)
    return qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)


@timed("attention")
def _attend(attn, pruning: ProbePruning, positions: torch.Tensor, q, k, v) -> tuple[StepAttention, torch.Tensor, torch.Tensor]:
    """Rotary and KV-cache write of every head; the step's attention, and q, k after rotary."""
    q, k = attn.rotary_emb(positions, q, k)
    return pruning.attend(attn.attn, q, k, v), q, k


class ProbePruningLlamaDecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer whose attention output and MLP run pruned."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, pruning: ProbePruning):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        attn, mlp = self.self_attn, self.mlp
        for linear in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            keep_dense_weight(linear)
        layer_index = extract_layer_index(prefix)
        self.attention_pruner = pruning.add_block(
            PrunableBlock(layer_index, "attention", attn.q_size, attn.head_dim),
            attn.o_proj,
            attn.attn,
        )
        self.mlp_pruner = pruning.add_block(
            PrunableBlock(layer_index, "mlp", mlp.down_proj.input_size_per_partition),
            mlp.down_proj,
            attn.attn,
        )
        self.packed_o_proj: execution.PackedUnits | None = None
        self.packed_mlp: execution.PackedUnits | None = None

    def prepare_pruned_execution(self) -> None:
        """After weights load: the packed kept-unit weights of both blocks."""
        attn, mlp = self.self_attn, self.mlp
        self.packed_o_proj = execution.pack_attention_output(attn.o_proj, attn.head_dim)
        self.packed_mlp = execution.pack_gated_mlp(mlp.gate_up_proj, mlp.down_proj)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same fused-residual convention as LlamaDecoderLayer: `residual` after
        # each norm is the residual stream entering the block.
        if residual is None:
            residual = hidden_states
            x = self.input_layernorm(hidden_states)
        else:
            x, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._attention_block(positions, x, residual)
        x, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self._mlp_block(x, residual)
        return hidden_states, residual

    def _attention_block(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        attn = self.self_attn
        pruning = self.attention_pruner.pruning
        q, k, v = _qkv(attn, x)
        # Every head writes its K/V for every token, whatever is pruned below:
        # a head kept at a later step must find its cache whole.
        heads, q, k = _attend(attn, pruning, positions, q, k, v)
        return self.attention_pruner.run(
            residual,
            probe=pruning.attention_probe(
                heads, q, k, v,
                num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, scale=attn.scaling,
            ),
            dense=lambda: attn.o_proj(heads.all_heads())[0],
            pruned=lambda kept, correction: execution.attention_output(
                self.packed_o_proj, attn.o_proj, heads, kept, correction
            ),
        )

    def _mlp_block(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp

        def probe(rows: torch.Tensor) -> torch.Tensor:  # [P] -> [P, I_local]
            gate_up = mlp.gate_up_proj
            return mlp.act_fn(execution.linear(x.index_select(0, rows), gate_up.weight, gate_up.bias))

        return self.mlp_pruner.run(
            residual,
            probe,
            dense=lambda: mlp(x),
            pruned=lambda kept, correction: execution.gated_mlp(
                self.packed_mlp, mlp.act_fn, mlp.down_proj, x, kept, correction
            ),
        )


class ProbePruningLlamaForCausalLM(ProbePruningModelMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM, pruned per step when probe pruning is on."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        pruning = ProbePruning.from_vllm_config(vllm_config)
        if pruning is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        else:

            def make_layer(*, vllm_config: VllmConfig, prefix: str) -> LlamaDecoderLayer:
                if not pruning.is_pruned(extract_layer_index(prefix)):
                    return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix)
                return ProbePruningLlamaDecoderLayer(
                    vllm_config=vllm_config, prefix=prefix, pruning=pruning
                )

            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=make_layer)
            pruning.build()
        self.probe_pruning = pruning

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        for layer in self.model.layers:
            if isinstance(layer, ProbePruningLlamaDecoderLayer):
                layer.prepare_pruned_execution()
