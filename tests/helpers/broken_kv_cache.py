"""A deliberately broken model, to show the KV-cache test can fail.

It zeroes the K/V of pruned heads before attention, as a kernel that skipped
writing them would leave them: tokens whose head was pruned when they were
prefilled carry no keys or values for that head at later steps.
Only for MHA LLaMA (KV head h serves query head h).
"""

import torch
from vllm_pp.integration.models.llama import ProbePruningLlamaDecoderLayer, ProbePruningLlamaForCausalLM
from vllm_pp.runtime.attention import AllHeadsAttention


class _SkipPrunedHeadsKVLayer(ProbePruningLlamaDecoderLayer):
    def _attention_block(self, positions, x, residual):
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        pruner = self.attention_pruner  # FixedSelection needs no probe
        kept = pruner.pruning.method.decide(pruner.block, pruner.pruning.steps.batch, residual, None)
        pruned = torch.ones(attn.num_kv_heads, dtype=torch.bool)
        pruned[kept] = False
        mask = (~pruned).repeat_interleave(attn.head_dim).to(k.dtype)
        heads_out = attn.attn(q, k * mask, v * mask)
        output, _, _ = pruner.adapter.pruned(AllHeadsAttention(heads_out), kept, None)
        return output


class SkipPrunedHeadsKV(ProbePruningLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for layer in self.model.layers:
            if isinstance(layer, ProbePruningLlamaDecoderLayer):
                layer.__class__ = _SkipPrunedHeadsKVLayer
