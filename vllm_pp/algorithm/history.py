"""History of the output projection's input statistics (docs/algorithm.md 2).

The history ``H[b, k]`` estimates ``E[x_k^2]``, the mean squared input of
o_proj / down_proj at channel ``k`` for tokens whose position falls in bucket
``b``. The paper keeps one row per absolute position 0..1023 (bucket size 1);
serving may use coarser buckets, and one bucket makes the history
position-agnostic.
"""

from typing import NamedTuple

import torch
from torch import Tensor

FP16_MAX = torch.finfo(torch.float16).max


def position_buckets(positions: Tensor, bucket_size: int, num_buckets: int) -> Tensor:
    """History row of each token: ``min(pos // bucket_size, num_buckets - 1)``.

    positions: LongTensor ``[T]`` (absolute positions within each sequence).
    Returns LongTensor ``[T]`` in ``[0, num_buckets)``. Positions beyond the
    last bucket share it, so long contexts never index out of range; clamping
    below as well makes every input a valid row index.
    """
    if bucket_size < 1 or num_buckets < 1:
        raise ValueError(f"need bucket_size, num_buckets >= 1, got {bucket_size}, {num_buckets}")
    return torch.div(positions, bucket_size, rounding_mode="floor").clamp(0, num_buckets - 1)


def _finite_nonneg(x: Tensor, clamp_max: float) -> Tensor:
    """``x`` in float32 with NaN -> 0 and values clamped to ``[0, clamp_max]``.

    The inputs are squared statistics, so they are non-negative by construction;
    this only removes what an fp16/bf16 overflow may have produced.
    """
    return torch.nan_to_num(x.float(), nan=0.0, posinf=clamp_max, neginf=0.0).clamp(0.0, clamp_max)


def fuse_probe_with_history(
    probe_sq: Tensor, history_rows: Tensor, clamp_max: float = FP16_MAX
) -> Tensor:
    """Importance-scaled fusion of probe and history (docs/algorithm.md 2.3), summed over probe rows.

    probe_sq: ``[P, C]`` squared o_proj/down_proj inputs of the P probe tokens
    (in serving each token is its own sample, so ``Pb = Z^2``, ``n_eff = 1``).
    history_rows: ``[P, C]``, the history row of each probe token's bucket.
    ``alpha = Pb / (Pb + Hs + 1e-6)``, ``F = alpha * Pb + (1 - alpha) * Hs``:
    the larger source dominates. Returns ``c = sum_t F[t]``, ``[C]`` float32.
    """
    if probe_sq.shape != history_rows.shape:
        raise ValueError(
            f"shape mismatch: probe {tuple(probe_sq.shape)}, history {tuple(history_rows.shape)}"
        )
    pb = _finite_nonneg(probe_sq, clamp_max)
    hs = _finite_nonneg(history_rows, clamp_max)
    alpha = pb / (pb + hs + 1e-6)
    return (alpha * pb + (1.0 - alpha) * hs).sum(dim=0)


def unfused_statistic(sq: Tensor, clamp_max: float = FP16_MAX) -> Tensor:
    """One source without fusion, summed over its rows: ``sum_t sq[t]``.

    The probe alone (Full-Batch Probing, the no-history ablation) or the probe
    tokens' history rows alone (the no-probe ablation). sq: ``[P, C]``.
    Returns ``[C]`` float32.
    """
    return _finite_nonneg(sq, clamp_max).sum(dim=0)


class StepRows(NamedTuple):
    """The history rows one step updates, found once per step for all blocks."""

    rows: Tensor  # [R] LongTensor, ascending history rows
    inverse: Tensor  # [T] LongTensor, index into ``rows`` of each token
    counts: Tensor  # [R, 1] float32, tokens per row (0: the row is left as it is)


def step_rows(buckets: Tensor, num_buckets: int | None = None) -> StepRows:
    """The rows of ``buckets`` ([T] LongTensor) with each token's row and the counts.

    Without ``num_buckets``: the distinct rows only (``torch.unique``, whose
    size is data-dependent: a device synchronisation on accelerators, cheap on
    the CPU, and the update then touches only the step's rows). With it: all
    ``num_buckets`` rows, counts 0 where the step has no token, in fixed-size
    operations (no synchronisation; what a CUDA graph can hold).
    """
    if num_buckets is None:
        rows, inverse, counts = torch.unique(buckets, return_inverse=True, return_counts=True)
        return StepRows(rows, inverse, counts.unsqueeze(1).to(torch.float32))
    counts = torch.zeros(num_buckets, 1, dtype=torch.float32, device=buckets.device)
    counts.index_add_(0, buckets, torch.ones(buckets.numel(), 1, device=buckets.device))
    return StepRows(torch.arange(num_buckets, device=buckets.device), buckets, counts)


def ema_update_(
    history: Tensor,
    buckets: Tensor | StepRows,
    sq_activations: Tensor,
    kept: Tensor,
    momentum: float,
) -> Tensor:
    """EMA update of the history from one step's full inference (docs/algorithm.md 2.4), in place.

    history: ``[B, C]`` (contiguous); buckets: LongTensor ``[T]``, or the
    step's :class:`StepRows`; sq_activations: ``[T, K]`` squared inputs of the
    kept channels; kept: LongTensor ``[K]`` (unique, any order, aligned with
    ``sq_activations``). For every bucket b present in the step:
    ``history[b, kept] = m * history[b, kept] + (1 - m) * mean_{t in b} sq[t]``.
    Pruned channels are neither decayed nor refreshed. A row whose new value is
    not finite (in ``history``'s dtype) is left unchanged so NaN/inf never enter
    the history.

    Returns the number of rows skipped (0 normally) as a 0-d int64 tensor on
    ``history``'s device: nothing here waits for the device, so a caller that
    accumulates the count reads it only when it reports it.
    """
    rows = buckets if isinstance(buckets, StepRows) else step_rows(buckets)
    layers = torch.zeros(1, dtype=torch.long, device=history.device)
    return ema_update_layers_(
        history.unsqueeze(0), layers, rows, sq_activations.unsqueeze(0), kept.unsqueeze(0), momentum
    )


def ema_update_layers_(
    history: Tensor,
    layers: Tensor,
    rows: StepRows,
    sq_activations: Tensor,
    kept: Tensor,
    momentum: float,
) -> Tensor:
    """:func:`ema_update_` of N blocks at once, each with its own kept channels.

    history: ``[L, B, C]`` contiguous, the histories of L blocks of one width;
    layers: LongTensor ``[N]``, the distinct blocks updated; sq_activations:
    ``[N, T, K]``; kept: LongTensor ``[N, K]``. Block ``layers[n]`` is updated
    exactly as ``ema_update_(history[layers[n]], rows, sq_activations[n],
    kept[n], momentum)`` would, in a fixed number of tensor operations however
    many blocks there are (on the CPU each operation costs microseconds of
    overhead, which a per-block update pays ~15 times per block and step).
    Returns the number of (block, row) pairs skipped.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    num_blocks, num_buckets, width = history.shape
    n, k = kept.shape
    if sq_activations.shape != (n, rows.inverse.numel(), k) or layers.shape != (n,):
        raise ValueError(
            f"sq_activations {tuple(sq_activations.shape)} != "
            f"(N={layers.numel()}, T={rows.inverse.numel()}, K={k})"
        )
    if not history.is_contiguous():
        raise ValueError("history must be contiguous: it is updated through a flat view")
    # Work on the present rows only: with per-position history B can be 1024
    # while a decode-heavy step touches a handful of buckets.
    r = rows.rows.numel()
    sums = torch.zeros(n, r, k, dtype=torch.float32, device=history.device)
    sums.index_add_(1, rows.inverse, sq_activations.float())
    # Row (layers[i], rows[j]) of the flat [L * B, C] history.
    flat_rows = (layers.unsqueeze(1) * num_buckets + rows.rows.unsqueeze(0)).view(-1)  # [N * R]
    flat = history.view(num_blocks * num_buckets, width)
    present = flat.index_select(0, flat_rows).view(n, r, width)  # [N, R, C]
    columns = kept.unsqueeze(1).expand(n, r, k)
    old = present.gather(2, columns).float()  # [N, R, K]
    new = torch.lerp(old, sums / rows.counts.clamp(min=1.0), 1.0 - momentum).to(history.dtype)
    # A non-finite row keeps its old values (written back unchanged), which
    # avoids a data-dependent selection of the finite rows. A row's float32
    # sum is finite exactly when its values are (K values of at most ~1e34
    # each cannot overflow it; squared activations stay far below that).
    finite = new.sum(dim=2, keepdim=True, dtype=torch.float32).isfinite()  # [N, R, 1]
    touched = rows.counts > 0  # [R, 1]: rows without tokens keep their values too
    present.scatter_(2, columns, torch.where(finite & touched, new, old.to(history.dtype)))
    flat.index_copy_(0, flat_rows, present.view(n * r, width))
    return (~finite & touched).sum()


class MergedMoments(NamedTuple):
    """Position-agnostic moments (float64): total count, and ``[C]`` mean, E[x^2], variance."""

    count: int
    mean: Tensor
    sq_mean: Tensor
    variance: Tensor


class CalibrationMoments:
    """Per-bucket, per-channel count, mean, E[x^2] and variance of a calibration stream.

    Feeds PP's initial history (``sq_mean``), FLAP (``variance``; ``mean`` for
    bias compensation) and Wanda-sp (``sq_mean``). Batches are merged with
    Chan's parallel update in float64, which stays accurate where the textbook
    ``E[x^2] - E[x]^2`` cancels catastrophically.
    """

    def __init__(
        self, num_buckets: int, num_channels: int, device: torch.device | str | None = None
    ):
        self._count = torch.zeros(num_buckets, dtype=torch.int64, device=device)
        self._mean = torch.zeros(num_buckets, num_channels, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(num_buckets, num_channels, dtype=torch.float64, device=device)

    def update(self, x: Tensor, buckets: Tensor) -> None:
        """Add a batch. x: ``[T, C]``; buckets: LongTensor ``[T]`` in ``[0, B)``."""
        num_buckets, num_channels = self._mean.shape
        if x.shape != (buckets.numel(), num_channels):
            raise ValueError(f"x {tuple(x.shape)} != (T={buckets.numel()}, C={num_channels})")
        x = x.to(device=self._mean.device, dtype=torch.float64)
        buckets = buckets.to(self._mean.device)
        n_b = torch.bincount(buckets, minlength=num_buckets)
        n_b64 = n_b.to(torch.float64).unsqueeze(1)
        mean_b = torch.zeros_like(self._mean).index_add_(0, buckets, x) / n_b64.clamp(min=1.0)
        dev = x - mean_b[buckets]
        m2_b = torch.zeros_like(self._m2).index_add_(0, buckets, dev * dev)
        n_a64 = self._count.to(torch.float64).unsqueeze(1)
        n64 = (n_a64 + n_b64).clamp(min=1.0)
        delta = mean_b - self._mean
        # Buckets absent from the batch have n_b = 0, so both corrections vanish.
        self._mean += delta * (n_b64 / n64)
        self._m2 += m2_b + delta * delta * (n_a64 * n_b64 / n64)
        self._count += n_b

    @property
    def count(self) -> Tensor:
        """``[B]`` int64, samples seen per bucket."""
        return self._count.clone()

    @property
    def mean(self) -> Tensor:
        """``[B, C]`` float64 mean of x (0 for empty buckets)."""
        return self._mean.clone()

    @property
    def variance(self) -> Tensor:
        """``[B, C]`` float64 population variance within each bucket (0 for empty buckets)."""
        return self._m2 / self._count.clamp(min=1).to(torch.float64).unsqueeze(1)

    @property
    def sq_mean(self) -> Tensor:
        """``[B, C]`` float64 mean of x^2 (= variance + mean^2)."""
        return self.variance + self._mean * self._mean

    def merged_over_buckets(self) -> MergedMoments:
        """Pool all buckets into position-agnostic ``[C]`` moments, weighting by counts.

        The pooled variance includes the spread between bucket means (law of
        total variance); it is not the sum or mean of per-bucket variances.
        """
        n = self._count.to(torch.float64).unsqueeze(1)
        total = n.sum().clamp(min=1.0)
        mean = (n * self._mean).sum(dim=0) / total
        m2 = self._m2.sum(dim=0) + (n * (self._mean - mean) ** 2).sum(dim=0)
        variance = m2 / total
        return MergedMoments(int(self._count.sum().item()), mean, variance + mean * mean, variance)
