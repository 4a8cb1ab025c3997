"""An independent plain-PyTorch reference of Probe Pruning as vLLM serves it.

Written from the paper (docs/algorithm.md) and the serving form of PP
listed below, sharing no code with ``vllm_pp``. It runs
one vLLM step at a time, in float64: all the step's token chunks (of several
requests, each with its own full KV cache, see ``reference_model.py``) go
through every layer together, because PP decides per step and block from all
of the step's tokens. Per pruned layer and block:

1. rank the step's tokens by the L2 norm of the residual stream entering the
   block; the probe is the top ``ceil(T * probe_ratio)`` tokens (at least
   ``min_tokens``, at most T), ties to the lower index in the step's order.
   With ``probe_selection="strided"`` the probe is that many tokens P evenly
   spaced over the step instead: token ``floor((i + 1/2) T / P)``, i < P.
   With ``every_decode_token``, an attention block's probe at a decode-only
   step (where the CPU backend attends on every head) is every token;
2. the probe activations Z are the probe tokens' rows of the output
   projection's input: the attention output of every head (over the tokens'
   real context), or act(gate(x)) * up(x) (OPT: relu(fc1(x) + b));
3. importance-scaled fusion with the history rows of the probe tokens'
   position buckets: ``a = Pb / (Pb + Hs + 1e-6)``, ``F = a Pb + (1 - a) Hs``,
   ``c_k = sum_t F[t, k]`` with ``Pb = Z^2``; with ``fusion="probe-only"``
   (full-batch probing, with ``probe_ratio=1``) ``c_k = sum_t Pb[t, k]``;
4. PPsp scores (MLP channel: ``||c_k W[:, k]^2||_2``; head: the L2 norm of
   ``c_k W[i, k]^2`` over the head's D x hd block of W_o) and the top units
   are kept: per-layer ratio ``r' = round(r L / (L - skipped), 2)``, heads
   ``H - floor(r' H)`` (at least 1), MLP channels ``I - floor(r' I)`` rounded
   up to a multiple of ``channel_multiple`` (at most I). Under tensor
   parallelism (``tp_size``) each rank does this for its contiguous shard of
   H / tp heads and I / tp channels (scores and fusion are per unit, so a
   shard's scores are the full model's restricted to it). With
   ``head_groups="kv"`` heads are kept by whole KV group instead (query heads
   ``g*j .. g*j + g - 1`` share KV head j): a group scores the sum of its
   heads' scores, and the top ``floor(k / g + 1/2)`` groups (at least 1) are
   kept, k being the per-head count above;
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

import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open

from helpers.reference_model import ReferenceModel, single_thread, step_forward

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
    # "importance-scaled": the fusion of step 3; "probe-only": the probe's Pb alone.
    fusion: str = "importance-scaled"
    # A decision stands for up to this many following decode-only steps with
    # as many requests (probe_pruning.reuse_decode_steps).
    reuse_decode_steps: int = 0
    # "query": heads chosen one by one; "kv": by whole KV group
    # (probe_pruning.method_options.head_groups).
    head_groups: str = "query"
    # "tokens": the largest residual norms; "strided": evenly spaced (probe_pruning.probe.selection).
    probe_selection: str = "tokens"
    # At decode-only steps, where vLLM's CPU backend attends on every head, an
    # attention block's probe is every token (probe_pruning.probe.every_decode_token).
    every_decode_token: bool = False
    # Tensor-parallel ranks: each holds a contiguous 1/tp of the heads and channels
    # and keeps its own top units at the ratio of its own count.
    tp_size: int = 1


@dataclass
class Decision:
    """One (step, layer, block) decision of the reference."""

    importance: torch.Tensor  # [T] residual norm of every token of the step
    probe_rows: list[int]  # rows the probe used (the reference's own or vLLM's)
    own_probe_rows: list[int]
    scores: torch.Tensor  # [units] PPsp scores
    kept: list[int]  # units the step ran with (the reference's own or vLLM's)
    own_kept: list[int]  # the reference's own top units
    # head_groups "kv", attention: [KV heads] sum of each group's head scores.
    group_scores: torch.Tensor | None = None


@dataclass
class Run:
    """Outputs of one replay: per request prompt logprobs and (greedy ids, their logprobs)."""

    prompt_logprobs: list[list[float]]
    tokens: list[tuple[list[int], list[float]]]
    decisions: dict[tuple[int, int, str], Decision] = field(default_factory=dict)
    reused_steps: dict[int, int] = field(default_factory=dict)  # step key -> key of the decision it kept


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
        self.group = self.heads // (c.get("num_key_value_heads") or self.heads)  # query heads per KV head
        self.width = c.get("intermediate_size") or c["ffn_dim"]
        self.pruned_layers = [i for i in range(num_layers) if i not in settings.skip_layers]
        ratio = min(1.0, round(settings.ratio * num_layers / (num_layers - len(settings.skip_layers)), 2))
        self.layer_ratio = ratio  # r'
        heads, width = self.heads // settings.tp_size, self.width // settings.tp_size  # per rank
        channels = width - math.floor(ratio * width)
        multiple = settings.channel_multiple
        # Units kept over all ranks, each rank keeping tp_size-th of them.
        self.kept_count = {
            "attention": settings.tp_size * max(1, heads - math.floor(ratio * heads)),
            "mlp": settings.tp_size * min(width, math.ceil(max(1, channels) / multiple) * multiple),
        }
        if settings.head_groups == "kv":  # nearest whole number of groups, halves up
            groups = max(1, math.floor(Fraction(self.kept_count["attention"], self.group) + Fraction(1, 2)))
            self.kept_count["attention"] = groups * self.group
        self.num_buckets = math.ceil(settings.max_model_len / settings.bucket_size)
        self.calibration = calibration
        self.reset()

    def reset(self) -> None:
        """History back to its start-of-serving value, no decision made yet."""
        self.reused_steps: dict[int, int] = {}
        self.last_kept: dict[tuple[int, str], list[int]] = {}
        self.history = {}
        for layer in self.pruned_layers:
            for kind, width in (("attention", self.heads * self.head_dim), ("mlp", self.width)):
                self.history[layer, kind] = (
                    self._calibrated_rows(layer, kind) if self.calibration
                    else torch.zeros(self.num_buckets, width, dtype=torch.float64)
                )

    def _calibrated_rows(self, layer: int, kind: str) -> torch.Tensor:
        with safe_open(str(self.calibration), framework="pt") as f:
            sq_mean = torch.cat([f.get_tensor(f"layers.{layer}.{kind}.rank{rank}.sq_mean").double()
                                 for rank in range(self.settings.tp_size)], dim=1)  # the ranks' shards
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
        buckets = [self._bucket(int(p)) for p in positions]
        if key in self.reused_steps:
            kept = self.last_kept[layer, kind]
        else:
            kept = self._decide(key, forced, decisions, layer, kind, residual, z, buckets)
        self.last_kept[layer, kind] = kept
        return self._update_history(layer, kind, kept, z, buckets)

    def _decide(self, key, forced, decisions, layer, kind, residual, z, buckets) -> list[int]:
        s = self.settings
        num_tokens = residual.shape[0]
        importance = residual.norm(dim=-1)
        num_probe = min(num_tokens, max(s.min_tokens, math.ceil(num_tokens * s.probe_ratio)))
        if s.every_decode_token and kind == "attention" and key in self.decode_only_steps:
            own_rows = list(range(num_tokens))
        elif s.probe_selection == "strided":
            own_rows = [math.floor(Fraction(2 * i + 1, 2) * Fraction(num_tokens, num_probe)) for i in range(num_probe)]
        else:
            own_rows = _top(importance, num_probe)
        vllm = forced.get((key, layer, kind)) if forced else None
        rows = vllm["probe_rows"] if vllm and "probe_rows" in vllm else own_rows

        history = self.history[layer, kind]
        pb = z[rows] ** 2
        hs = history[[buckets[r] for r in rows]] if s.use_history else torch.zeros_like(pb)
        alpha = pb / (pb + hs + 1e-6)
        c = pb.sum(0) if s.fusion == "probe-only" else (alpha * pb + (1 - alpha) * hs).sum(0)

        w_out = output_weight(self.model, layer, kind)
        group_scores = None
        if kind == "attention":
            block = (c[None, :] * w_out**2).view(w_out.shape[0], self.heads, self.head_dim)
            scores = block.pow(2).sum(dim=(0, 2)).sqrt()
        else:
            scores = (c[None, :] * w_out**2).pow(2).sum(0).sqrt()
        if kind == "attention" and s.head_groups == "kv":
            group_scores = torch.stack([
                sum(scores[h] for h in range(j * self.group, (j + 1) * self.group))
                for j in range(self.heads // self.group)
            ])
            kept_groups = _top(group_scores, self.kept_count[kind] // self.group)
            own_kept = [j * self.group + i for j in kept_groups for i in range(self.group)]
        else:  # each rank its own top units among its shard
            local, count = scores.numel() // s.tp_size, self.kept_count[kind] // s.tp_size
            own_kept = [r * local + u for r in range(s.tp_size) for u in _top(scores[r * local:(r + 1) * local], count)]
        kept = vllm["kept"] if vllm and "kept" in vllm else own_kept
        decisions[key, layer, kind] = Decision(
            importance, rows, own_rows, scores, kept, own_kept, group_scores
        )
        return kept

    def _update_history(self, layer, kind, kept, z, buckets) -> torch.Tensor:
        """EMA of the kept channels from the full step, at every step; z with pruned channels zeroed."""
        s = self.settings
        num_tokens = z.shape[0]
        history = self.history[layer, kind]
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

    def _reused_steps(self, steps) -> dict[int, int]:
        """Steps that keep an earlier decision: step key -> key of the deciding step.

        A decode-only step (every request one token) that follows the previous
        step, holds as many requests as the last deciding step and comes at
        most ``reuse_decode_steps`` steps after it.
        """
        reused, decided_at, requests, previous = {}, None, None, None
        for key, segments in steps:
            decode_only = all(length == 1 for _, _, length in segments)
            if (
                previous is not None and key == previous + 1 and decode_only
                and len(segments) == requests
                and key - decided_at <= self.settings.reuse_decode_steps
            ):
                reused[key] = decided_at
            else:
                decided_at, requests = key, len(segments)
            previous = key
        return reused

    def _run(self, prompts, steps, decode_steps, forced, forced_tokens) -> Run:
        self.reset()
        self.reused_steps = self._reused_steps(steps)
        self.decode_only_steps = {key for key, segments in steps if all(n == 1 for _, _, n in segments)}
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
        run = Run([], [], decisions, self.reused_steps)
        for prompt, sequence, parts in zip(prompts, sequences, logprobs):
            lp = torch.cat(parts)
            run.prompt_logprobs.append([lp[i, sequence[i + 1]].item() for i in range(len(prompt) - 1)])
            generated = sequence[len(prompt):][:decode_steps]
            at = range(len(prompt) - 1, len(prompt) - 1 + len(generated))
            run.tokens.append((generated, [lp[i, sequence[i + 1]].item() for i in at]))
        return run
