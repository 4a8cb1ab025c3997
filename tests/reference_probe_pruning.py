"""An independent plain-PyTorch reference of Probe Pruning as vLLM serves it.

Written from ``shared/design/probe_pruning_spec.md`` and the serving form of PP
listed below, sharing no code with ``vllm_pp``. It runs
one vLLM step at a time, in float64: all the step's token chunks (of several
requests, each with its own full KV cache, see ``reference_model.py``) go
through every layer together, because PP decides per step and block from all
of the step's tokens. Per pruned layer and block:

1. rank the step's tokens by the L2 norm of the residual stream entering the
   block; the probe is the top ``ceil(T * probe_ratio)`` tokens (at least
   ``min_tokens``, at most T), ties to the lower index in the step's order;
2. the probe activations Z are the probe tokens' rows of the output
   projection's input: the attention output of every head (over the tokens'
   real context), or act(gate(x)) * up(x) (OPT: relu(fc1(x) + b));
3. importance-scaled fusion with the history rows of the probe tokens'
   position buckets: ``a = Pb / (Pb + Hs + 1e-6)``, ``F = a Pb + (1 - a) Hs``,
   ``c_k = sum_t F[t, k]`` with ``Pb = Z^2``;
4. PPsp scores (MLP channel: ``||c_k W[:, k]^2||_2``; head: the L2 norm of
   ``c_k W[i, k]^2`` over the head's D x hd block of W_o) and the top units
   are kept: per-layer ratio ``r' = round(r L / (L - skipped), 2)``, heads
   ``H - floor(r' H)`` (at least 1), MLP channels ``I - floor(r' I)`` rounded
   up to a multiple of ``channel_multiple`` (at most I);
5. the block runs with the output projection's input zeroed outside the kept
   units; then, for every bucket b among the step's tokens,
   ``H[b, kept] = m H[b, kept] + (1 - m) mean_{t in b} x[t, kept]^2``.

The history starts from a calibration file's per-position ``sq_mean``, pooled
into buckets weighted by ``count`` (buckets without calibrated positions get
the count-weighted mean over all positions).

Replaying vLLM: ``ReferenceProbePruning.run`` can take vLLM's logged kept units
(and probe rows) instead of its own choices, so every later step sees the
history vLLM had; each decision records the reference's scores and its own
choice either way.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open

from reference_model import ReferenceModel

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


def output_weight(model: ReferenceModel, layer: int, kind: str) -> torch.Tensor:
    """The block's output projection weight ``[D, C]`` (o_proj/out_proj, down_proj/fc2)."""
    if model.is_opt:
        name = "self_attn.out_proj" if kind == "attention" else "fc2"
        return model.w[f"decoder.layers.{layer}.{name}.weight"]
    name = "self_attn.o_proj" if kind == "attention" else "mlp.down_proj"
    return model.w[f"layers.{layer}.{name}.weight"]


def calibration_statistics(model: ReferenceModel, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Dense-model statistics of every block's output-projection input, per position.

    Tensors under the calibration file's TP-rank-0 names ``layers.{l}.{kind}.rank0.{stat}``:
    ``sq_mean`` [P, C] (E[x^2] per position), ``count`` [P], ``mean`` [C] (over all
    tokens) and ``variance_sum`` [C] (per-position variances summed), where P is
    the longest window.
    """
    seen = defaultdict(list)

    def record(layer, kind, residual, activations, positions):
        seen[layer, kind].append((positions, activations))
        return activations

    with single_thread():
        for window in windows:
            step_forward(model, [(window, 0, model.new_cache())], record)
    num_positions = max(len(w) for w in windows)
    tensors = {}
    for (layer, kind), parts in seen.items():
        positions = torch.cat([p for p, _ in parts])
        x = torch.cat([a for _, a in parts])
        count = torch.bincount(positions, minlength=num_positions)
        n = count.double().clamp(min=1)[:, None]
        sums = torch.zeros(num_positions, x.shape[1], dtype=torch.float64).index_add_(0, positions, x)
        sq_sums = torch.zeros_like(sums).index_add_(0, positions, x * x)
        mean_p, sq_mean = sums / n, sq_sums / n
        stats = {
            "sq_mean": sq_mean.float(),
            "count": count,
            "mean": x.mean(0).float(),
            "variance_sum": (sq_mean - mean_p**2).sum(0).float(),
        }
        for stat, value in stats.items():
            tensors[f"layers.{layer}.{kind}.rank0.{stat}"] = value
    return tensors


@dataclass(frozen=True)
class Settings:
    """The serving PP configuration the reference reproduces."""

    ratio: float
    probe_ratio: float
    min_tokens: int = 1
    skip_layers: tuple[int, ...] = (0,)
    channel_multiple: int = 1
    ema_momentum: float = 0.99
    bucket_size: int = 1
    max_model_len: int = 512
    # Negative-control switch: fuse with an all-zero history (probe only).
    use_history: bool = True


@dataclass
class Decision:
    """One (step, layer, block) decision of the reference."""

    importance: torch.Tensor  # [T] residual norm of every token of the step
    probe_rows: list[int]  # rows the probe used (the reference's own or vLLM's)
    own_probe_rows: list[int]
    scores: torch.Tensor  # [units] PPsp scores
    kept: list[int]  # units the step ran with (the reference's own or vLLM's)
    own_kept: list[int]  # the reference's own top units


@dataclass
class Run:
    """Outputs of one replay: per request prompt logprobs and (greedy ids, their logprobs)."""

    prompt_logprobs: list[list[float]]
    tokens: list[tuple[list[int], list[float]]]
    decisions: dict[tuple[int, int, str], Decision] = field(default_factory=dict)


def _top(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index, ascending."""
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))
    return sorted(order[:k])


class ReferenceProbePruning:
    """PP decisions and history for one model, replayed step by step in float64."""

    def __init__(self, model: ReferenceModel, settings: Settings, calibration: Path | None):
        self.model, self.settings = model, settings
        c = model.config
        num_layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.width = c.get("intermediate_size") or c["ffn_dim"]
        self.pruned_layers = [i for i in range(num_layers) if i not in settings.skip_layers]
        ratio = min(1.0, round(settings.ratio * num_layers / (num_layers - len(settings.skip_layers)), 2))
        channels = self.width - math.floor(ratio * self.width)
        multiple = settings.channel_multiple
        self.kept_count = {
            "attention": max(1, self.heads - math.floor(ratio * self.heads)),
            "mlp": min(self.width, math.ceil(max(1, channels) / multiple) * multiple),
        }
        self.num_buckets = math.ceil(settings.max_model_len / settings.bucket_size)
        self.calibration = calibration
        self.reset()

    def reset(self) -> None:
        """History back to its start-of-serving value."""
        self.history = {}
        for layer in self.pruned_layers:
            for kind, width in (("attention", self.heads * self.head_dim), ("mlp", self.width)):
                self.history[layer, kind] = (
                    self._calibrated_rows(layer, kind) if self.calibration
                    else torch.zeros(self.num_buckets, width, dtype=torch.float64)
                )

    def _calibrated_rows(self, layer: int, kind: str) -> torch.Tensor:
        with safe_open(str(self.calibration), framework="pt") as f:
            sq_mean = f.get_tensor(f"layers.{layer}.{kind}.rank0.sq_mean").double()
            count = f.get_tensor(f"layers.{layer}.{kind}.rank0.count").double()
        rows = torch.zeros(self.num_buckets, sq_mean.shape[1], dtype=torch.float64)
        weights = torch.zeros(self.num_buckets, dtype=torch.float64)
        for position in range(sq_mean.shape[0]):
            b = self._bucket(position)
            rows[b] += count[position] * sq_mean[position]
            weights[b] += count[position]
        overall = (count[:, None] * sq_mean).sum(0) / count.sum()
        for b in range(self.num_buckets):
            rows[b] = rows[b] / weights[b] if weights[b] > 0 else overall
        return rows

    def _bucket(self, position: int) -> int:
        return min(position // self.settings.bucket_size, self.num_buckets - 1)

    # ------------------------------------------------------------- one block
    def _block(self, key, forced, decisions, layer, kind, residual, z, positions):
        if layer not in self.pruned_layers:
            return z
        s = self.settings
        num_tokens = residual.shape[0]
        importance = residual.norm(dim=-1)
        num_probe = min(num_tokens, max(s.min_tokens, math.ceil(num_tokens * s.probe_ratio)))
        own_rows = _top(importance, num_probe)
        vllm = forced.get((key, layer, kind)) if forced else None
        rows = vllm["probe_rows"] if vllm and "probe_rows" in vllm else own_rows

        history = self.history[layer, kind]
        buckets = [self._bucket(int(p)) for p in positions]
        pb = z[rows] ** 2
        hs = history[[buckets[r] for r in rows]] if s.use_history else torch.zeros_like(pb)
        alpha = pb / (pb + hs + 1e-6)
        c = (alpha * pb + (1 - alpha) * hs).sum(0)

        w_out = output_weight(self.model, layer, kind)
        if kind == "attention":
            block = (c[None, :] * w_out**2).view(w_out.shape[0], self.heads, self.head_dim)
            scores = block.pow(2).sum(dim=(0, 2)).sqrt()
        else:
            scores = (c[None, :] * w_out**2).pow(2).sum(0).sqrt()
        own_kept = _top(scores, self.kept_count[kind])
        kept = vllm["kept"] if vllm and "kept" in vllm else own_kept
        decisions[key, layer, kind] = Decision(importance, rows, own_rows, scores, kept, own_kept)

        unit = self.head_dim if kind == "attention" else 1
        channels = [u * unit + j for u in kept for j in range(unit)]
        mask = torch.zeros(z.shape[1], dtype=torch.float64)
        mask[channels] = 1.0
        x = z * mask
        m = s.ema_momentum
        for b in sorted(set(buckets)):
            rows_b = [t for t in range(num_tokens) if buckets[t] == b]
            mean_sq = (x[rows_b][:, channels] ** 2).mean(0)
            history[b, channels] = m * history[b, channels] + (1 - m) * mean_sq
        return x

    # ---------------------------------------------------------------- replay
    def run(
        self,
        prompts: list[list[int]],
        steps: list[tuple[int, list[tuple[int, int, int]]]],
        decode_steps: int,
        forced: dict | None = None,
        forced_tokens: list[list[int]] | None = None,
    ) -> Run:
        """Replay a schedule from a fresh history.

        steps: per step, its key and segments ``(request, start, length)`` in the
        step's token order. forced: ``{(key, layer, kind): {"kept": [...],
        "probe_rows": [...]}}`` taken instead of the reference's own choices
        (either entry may be left out). forced_tokens: per request, the generated
        tokens to feed instead of the reference's own greedy ones.
        """
        with single_thread():
            return self._run(prompts, steps, decode_steps, forced, forced_tokens)

    def _run(self, prompts, steps, decode_steps, forced, forced_tokens) -> Run:
        self.reset()
        sequences = [list(p) + list(forced_tokens[r] if forced_tokens else []) for r, p in enumerate(prompts)]
        caches = [self.model.new_cache() for _ in prompts]
        logprobs = [[] for _ in prompts]
        decisions = {}
        for key, segments in steps:
            chunks = [(sequences[r][start:start + length], start, caches[r]) for r, start, length in segments]

            def block(layer, kind, residual, z, positions, key=key):
                return self._block(key, forced, decisions, layer, kind, residual, z, positions)

            for (r, start, length), logits in zip(segments, step_forward(self.model, chunks, block)):
                logprobs[r].append(torch.log_softmax(logits, -1))
                if forced_tokens is None and start + length >= len(sequences[r]):
                    sequences[r].append(int(logits[-1].argmax()))
        run = Run([], [], decisions)
        for prompt, sequence, parts in zip(prompts, sequences, logprobs):
            lp = torch.cat(parts)
            run.prompt_logprobs.append([lp[i, sequence[i + 1]].item() for i in range(len(prompt) - 1)])
            generated = sequence[len(prompt):][:decode_steps]
            at = range(len(prompt) - 1, len(prompt) - 1 + len(generated))
            run.tokens.append((generated, [lp[i, sequence[i + 1]].item() for i in at]))
        return run
