"""An independent plain-PyTorch forward of LLaMA and OPT with pruned heads/channels.

``step_forward`` runs one vLLM step (chunks of several sequences, each with its
own cache) through every layer together, calling a ``block`` hook on every
output projection's input; ``ReferenceModel.forward`` is one sequence with
fixed masks.

Written from the model definitions and docs/algorithm.md, sharing no code with
``vllm_pp``: it reads the Hugging Face checkpoint directly, keeps a full
(unpaged) KV cache per sequence, and prunes by zeroing the output projection's
input outside the kept heads/channels, which is the mathematical meaning of
running o_proj/down_proj on the kept columns only.

``kept(layer, kind, key)`` returns the kept global unit indices (heads for
"attention", channels for "mlp") or None for dense; ``key`` is the largest
key of the vLLM step the tokens belong to (see selection_hooks.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

KeptFn = Callable[[int, str, int], "torch.Tensor | None"]


class ReferenceModel:
    """Runs sequences one at a time, in float64, with a per-sequence KV cache."""

    def __init__(self, model_dir: Path):
        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        weights = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            weights.update(load_file(path))
        self.w = {k.removeprefix("model."): v.double() for k, v in weights.items()}
        self.is_opt = self.config["model_type"] == "opt"

    def new_cache(self) -> list[dict[str, torch.Tensor]]:
        return [dict() for _ in range(self.config["num_hidden_layers"])]

    def forward(
        self, token_ids: list[int], start: int, cache, kept: KeptFn, key: int
    ) -> torch.Tensor:
        """Logits [len(token_ids), vocab] for tokens at positions start.. of one sequence."""
        c = self.config
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

        def prune(layer, kind, residual, activations, positions):
            units = kept(layer, kind, key)
            if units is None:
                return activations
            width = head_dim if kind == "attention" else 1
            mask = torch.zeros(activations.shape[1] // width, dtype=activations.dtype)
            mask[units] = 1.0
            return activations * mask.repeat_interleave(width)

        return step_forward(self, [(token_ids, start, cache)], prune)[0]

    # ------------------------------------------------------------ attention
    @staticmethod
    def _attend(q, k, v, layer_cache, group: int) -> torch.Tensor:
        """Causal attention of new tokens over cached + new keys: [T, H*hd]."""
        k_all = torch.cat([layer_cache["k"], k]) if "k" in layer_cache else k
        v_all = torch.cat([layer_cache["v"], v]) if "v" in layer_cache else v
        layer_cache["k"], layer_cache["v"] = k_all, v_all
        k_all = k_all.repeat_interleave(group, dim=1)
        v_all = v_all.repeat_interleave(group, dim=1)
        num_new, num_all = q.shape[0], k_all.shape[0]
        scores = torch.einsum("thd,shd->hts", q, k_all) / math.sqrt(q.shape[-1])
        query_pos = torch.arange(num_all - num_new, num_all)[:, None]
        scores = scores.masked_fill(torch.arange(num_all)[None] > query_pos, float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v_all)
        return out.reshape(num_new, -1)


# block(layer, kind, residual [T, D], activations [T, C], positions [T]) returns the
# output projection's input [T, C] (the activations, pruned or not).
BlockFn = Callable[[int, str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# One chunk of a step: (token ids, position of the first, the sequence's KV cache).
Segment = tuple[list[int], int, list]


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: the reference's matrices are tiny, and on a busy
    machine OpenMP's thread hand-offs make them ~10x slower than one thread.

    Calls the builtin ``torch._C.set_num_threads``: a process that hosted an
    in-process vLLM CPU engine has ``torch.set_num_threads`` replaced by a no-op.
    """
    threads = torch.get_num_threads()
    torch._C.set_num_threads(1)
    try:
        yield
    finally:
        torch._C.set_num_threads(threads)


def step_forward(model: ReferenceModel, segments: list[Segment], block: BlockFn) -> list[torch.Tensor]:
    """Logits of every segment of one step, all segments going through each layer together.

    ``block`` sees every block's residual and output-projection input for all the
    step's tokens, in the segments' order, before the output projection runs.
    """
    ids = torch.tensor([t for tokens, _, _ in segments for t in tokens])
    positions = torch.cat([torch.arange(start, start + len(tokens)) for tokens, start, _ in segments])
    bounds = [0]
    for tokens, _, _ in segments:
        bounds.append(bounds[-1] + len(tokens))
    spans = list(zip(bounds[:-1], bounds[1:]))
    caches = [cache for _, _, cache in segments]

    def attend(layer, q, k, v, group):  # each segment over its own sequence's cache
        return torch.cat([
            ReferenceModel._attend(q[a:b], k[a:b], v[a:b], cache[layer], group)
            for (a, b), cache in zip(spans, caches)
        ])

    forward = _opt if model.is_opt else _llama
    logits = forward(model, ids, positions, attend, block)
    return [logits[a:b] for a, b in spans]


def _llama(model, ids, positions, attend, block):
    c, w = model.config, model.w
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    eps = c["rms_norm_eps"]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[:, None].double() * inv_freq[None]
    cos, sin = angles.cos().repeat(1, 2)[:, None], angles.sin().repeat(1, 2)[:, None]

    def rope(x):  # [T, n, hd], rotate-half convention
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = w["embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim)
        out = block(i, "attention", h, attend(i, rope(q), rope(k), v, heads // kv_heads), positions)
        h = h + out @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        inner = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + block(i, "mlp", h, inner, positions) @ w[p + "mlp.down_proj.weight"].T
    h = rms(h, w["norm.weight"])
    return h @ w.get("lm_head.weight", w["embed_tokens.weight"]).T


def _opt(model, ids, positions, attend, block):
    c, w = model.config, model.w
    heads = c["num_attention_heads"]
    head_dim = c["hidden_size"] // heads
    pre_norm = c.get("do_layer_norm_before", True)

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-5)

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    d = "decoder."
    h = w[d + "embed_tokens.weight"][ids] + w[d + "embed_positions.weight"][positions + 2]
    for i in range(c["num_hidden_layers"]):
        p = f"{d}layers.{i}."
        x = ln(h, p + "self_attn_layer_norm") if pre_norm else h
        q = linear(x, p + "self_attn.q_proj").view(-1, heads, head_dim)
        k = linear(x, p + "self_attn.k_proj").view(-1, heads, head_dim)
        v = linear(x, p + "self_attn.v_proj").view(-1, heads, head_dim)
        out = block(i, "attention", h, attend(i, q, k, v, 1), positions)
        h = h + linear(out, p + "self_attn.out_proj")
        if not pre_norm:
            h = ln(h, p + "self_attn_layer_norm")
        x = ln(h, p + "final_layer_norm") if pre_norm else h
        inner = F.relu(linear(x, p + "fc1"))
        h = h + linear(block(i, "mlp", h, inner, positions), p + "fc2")
        if not pre_norm:
            h = ln(h, p + "final_layer_norm")
    if pre_norm:
        h = ln(h, d + "final_layer_norm")
    return h @ w.get("lm_head.weight", w[d + "embed_tokens.weight"]).T
