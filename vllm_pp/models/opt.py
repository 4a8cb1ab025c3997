"""OPT with probe pruning, on top of vLLM's OPTForCausalLM.

vLLM's OPTDecoder hard-codes its layer class, so the pruned layers are made by
switching the class of the already-built layers (same modules and parameters,
new forward) before weights load.
"""

from __future__ import annotations

from itertools import islice

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.opt import OPTDecoderLayer, OPTForCausalLM

from vllm_pp import execution
from vllm_pp.attention import StepAttention
from vllm_pp.methods.base import PrunableBlock
from vllm_pp.profiling import timed
from vllm_pp.pruning import ProbePruning, ProbePruningModelMixin
from vllm_pp.vllm_compat import keep_dense_weight


@timed("q/k/v projection")
def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    qkv, _ = attn.qkv_proj(x)
    return qkv.chunk(chunks=3, dim=-1)


@timed("attention")
def _attend(attn, pruning: ProbePruning, q, k, v) -> StepAttention:
    """KV-cache write of every head; the step's attention."""
    return pruning.attend(attn.attn, q, k, v)


class ProbePruningOPTDecoderLayer(OPTDecoderLayer):
    """An OPT decoder layer whose attention output and MLP run pruned."""

    def attach(self, pruning: ProbePruning, layer_index: int) -> None:
        attn = self.self_attn
        for linear in (attn.out_proj, self.fc1, self.fc2):
            keep_dense_weight(linear)
        self.attention_pruner = pruning.add_block(
            PrunableBlock(layer_index, "attention", attn.num_heads * attn.head_dim, attn.head_dim),
            attn.out_proj,
            attn.attn,
        )
        self.mlp_pruner = pruning.add_block(
            PrunableBlock(layer_index, "mlp", self.fc2.input_size_per_partition),
            self.fc2,
            attn.attn,
        )
        self.packed_out_proj: execution.PackedUnits | None = None
        self.packed_mlp: execution.PackedUnits | None = None

    def prepare_pruned_execution(self) -> None:
        """After weights load: the packed kept-unit weights of both blocks."""
        attn = self.self_attn
        self.packed_out_proj = execution.pack_attention_output(attn.out_proj, attn.head_dim)
        self.packed_mlp = execution.pack_plain_mlp(self.fc1, self.fc2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        x = self.self_attn_layer_norm(hidden_states) if self.do_layer_norm_before else hidden_states
        hidden_states = residual + self._attention_block(x, residual)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        x = self.final_layer_norm(hidden_states) if self.do_layer_norm_before else hidden_states
        hidden_states = residual + self._mlp_block(x, residual)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states

    def _attention_block(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn
        pruning = self.attention_pruner.pruning
        q, k, v = _qkv(attn, x)
        # Every head writes its K/V for every token (see llama.py).
        heads = _attend(attn, pruning, q, k, v)
        return self.attention_pruner.run(
            residual,
            probe=pruning.attention_probe(
                heads, q, k, v,
                num_kv_heads=attn.num_heads, head_dim=attn.head_dim, scale=attn.scaling,
            ),
            dense=lambda: attn.out_proj(heads.all_heads())[0],
            pruned=lambda kept, correction: execution.attention_output(
                self.packed_out_proj, attn.out_proj, heads, kept, correction
            ),
        )

    def _mlp_block(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        def probe(rows: torch.Tensor) -> torch.Tensor:  # [P] -> [P, ffn_local]
            return self.activation_fn(execution.linear(x.index_select(0, rows), self.fc1.weight, self.fc1.bias))

        return self.mlp_pruner.run(
            residual,
            probe,
            dense=lambda: self.fc2(self.activation_fn(self.fc1(x)[0]))[0],
            pruned=lambda kept, correction: execution.plain_mlp(
                self.packed_mlp, self.activation_fn, self.fc2, x, kept, correction
            ),
        )


class ProbePruningOPTForCausalLM(ProbePruningModelMixin, OPTForCausalLM):
    """vLLM's OPTForCausalLM, pruned per step when probe pruning is on."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        pruning = ProbePruning.from_vllm_config(vllm_config)
        if pruning is not None:
            decoder = self.model.decoder
            layers = islice(decoder.layers, decoder.start_layer, decoder.end_layer)
            for index, layer in enumerate(layers, start=decoder.start_layer):
                if pruning.is_pruned(index):
                    layer.__class__ = ProbePruningOPTDecoderLayer
                    layer.attach(pruning, index)
            pruning.build()
        self.probe_pruning = pruning

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        for layer in self.model.decoder.layers:
            if isinstance(layer, ProbePruningOPTDecoderLayer):
                layer.prepare_pruned_execution()
