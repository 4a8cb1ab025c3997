"""Tests for vllm_pp.algorithm: pure tensor functions, no vLLM."""

import math

import pytest
import torch

from vllm_pp.algorithm.history import (
    CalibrationMoments,
    ema_update_,
    ema_update_layers_,
    fuse_probe_with_history,
    position_buckets,
    step_rows,
    unfused_statistic,
)
from vllm_pp.algorithm.probe import (
    num_probe_tokens,
    probe_only_attention,
    select_probe_requests,
    select_probe_tokens,
    select_strided_tokens,
    token_importance,
)
from vllm_pp.algorithm.scores import (
    attention_head_scores,
    channel_weight_norm,
    flap_bias_compensation,
    flap_channel_scores,
    flap_head_scores,
    mlp_channel_scores,
    wanda_sp_channel_scores,
    wanda_sp_head_scores,
)
from vllm_pp.algorithm.selection import (
    flap_allocation,
    kept_heads_to_channels,
    layer_ratio,
    num_kept_channels,
    num_kept_heads,
    top_k_indices,
)

FP16_MAX = torch.finfo(torch.float16).max


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- probe


def test_token_importance_is_float32_l2_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.bfloat16)
    out = token_importance(x)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, torch.tensor([5.0, 0.0, math.sqrt(2.0)]))


def test_token_importance_accumulates_in_float32():
    # 4096 bf16 ones: a bf16 accumulator would stall at 256 (its integer limit).
    x = torch.ones(1, 4096, dtype=torch.bfloat16)
    assert token_importance(x).item() == pytest.approx(64.0)


@pytest.mark.parametrize(
    "num_tokens, ratio, min_tokens, expected",
    [(10, 0.5, 1, 5), (7, 0.5, 1, 4), (1, 0.5, 1, 1), (0, 0.5, 1, 0), (20, 0.05, 2, 2),
     (1, 0.05, 2, 1), (4, 1.0, 1, 4), (4, 2.0, 1, 4), (512, 0.1, 1, 52)],
)
def test_num_probe_tokens(num_tokens, ratio, min_tokens, expected):
    assert num_probe_tokens(num_tokens, ratio, min_tokens) == expected


def test_num_probe_tokens_rejects_negative():
    with pytest.raises(ValueError):
        num_probe_tokens(4, -0.1)


def test_select_probe_tokens_ascending_and_ties_to_lower_index():
    importance = torch.tensor([1.0, 5.0, 3.0, 5.0, 0.0, 3.0])
    assert select_probe_tokens(importance, 2).tolist() == [1, 3]
    assert select_probe_tokens(importance, 1).tolist() == [1]
    assert select_probe_tokens(importance, 3).tolist() == [1, 2, 3]  # 2 beats 5 on the tie
    assert select_probe_tokens(importance, 0).tolist() == []
    assert select_probe_tokens(importance, 6).tolist() == list(range(6))


def test_select_strided_tokens_spreads_the_probe_over_the_step():
    assert select_strided_tokens(10, 3).tolist() == [1, 5, 8]  # floor((i + 1/2) * 10 / 3)
    assert select_strided_tokens(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert select_strided_tokens(7, 0).tolist() == []
    # 8 requests of 512 tokens at the default 2.5%: 103 probe tokens, 12 or 13 in each request.
    rows = select_strided_tokens(4096, num_probe_tokens(4096, 0.025))
    assert sorted(torch.bincount(rows // 512).tolist()) == [12] + [13] * 7
    with pytest.raises(ValueError, match="num_probe <= num_tokens"):
        select_strided_tokens(3, 4)


def test_select_probe_requests_tokens_then_requests():
    # Requests: [0] (5), [1] (1), [2..5] (2, 9, 3, 3), [6, 7] (0.5, 7).
    importance = torch.tensor([5.0, 1.0, 2.0, 9.0, 3.0, 3.0, 0.5, 7.0])
    query_start_loc = torch.tensor([0, 1, 2, 6, 8], dtype=torch.int32)
    # Half of each request's tokens (at least one): 0 | 1 | 3, 4 (tie 4/5 to the
    # lower index) | 7; request scores 5, 1, sqrt(90), 7.
    assert select_probe_requests(importance, query_start_loc, 0.05, 0.5).tolist() == [3, 4]
    assert select_probe_requests(importance, query_start_loc, 0.5, 0.5).tolist() == [3, 4, 7]
    assert select_probe_requests(importance, query_start_loc, 0.75, 0.5).tolist() == [0, 3, 4, 7]
    assert select_probe_requests(importance, query_start_loc, 1.0, 1.0).tolist() == list(range(8))


def test_select_probe_requests_on_a_decode_step_is_the_top_tokens():
    importance = torch.rand(40, generator=_gen(3))
    query_start_loc = torch.arange(41, dtype=torch.int32)
    assert torch.equal(
        select_probe_requests(importance, query_start_loc, 0.05, 0.5),
        select_probe_tokens(importance, 2),
    )


def test_probe_only_attention_attends_within_request_and_causally():
    # 5 probe tokens of two requests, 4 query heads sharing 2 KV heads (GQA).
    g = _gen(5)
    q, k, v = torch.randn(5, 4, 8, generator=g), torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    positions = torch.tensor([3, 10, 40, 0, 7])
    requests = torch.tensor([0, 0, 0, 1, 1])
    out = probe_only_attention(q, k, v, positions, requests, 0.3)
    assert out.shape == (5, 32)
    for t in range(5):
        context = [j for j in range(5) if requests[j] == requests[t] and positions[j] <= positions[t]]
        for h in range(4):
            keys, values = k[context, h // 2], v[context, h // 2]
            weights = torch.softmax(keys @ q[t, h] * 0.3, dim=0)
            torch.testing.assert_close(out[t, h * 8:(h + 1) * 8], weights @ values)

def test_select_probe_requests_matches_a_per_request_loop():
    lengths = [7, 1, 33, 2, 16, 1]
    importance = torch.rand(sum(lengths), generator=_gen(4))
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    kept, scores = [], []
    for r, n in enumerate(lengths):
        own = importance[starts[r]:starts[r + 1]]
        top = starts[r] + select_probe_tokens(own, math.ceil(n * 0.3))
        kept.append(top)
        scores.append(importance[top].square().sum())
    chosen = sorted(select_probe_tokens(torch.stack(scores), 2).tolist())
    expected = torch.cat([kept[r] for r in chosen])
    got = select_probe_requests(importance, torch.tensor(starts, dtype=torch.int32), 0.3, 0.3)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------- selection


def _reference_top_k(scores: list[float], k: int) -> list[int]:
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def test_top_k_indices_matches_reference_with_many_ties():
    g = _gen(1)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        # Few distinct values, so ties are everywhere.
        scores = torch.randint(0, 4, (n,), generator=g).float()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        out = top_k_indices(scores, k)
        assert out.dtype == torch.int64
        assert out.tolist() == _reference_top_k(scores.tolist(), k)


def test_top_k_indices_all_equal_and_nan():
    assert top_k_indices(torch.zeros(5), 3).tolist() == [0, 1, 2]
    scores = torch.tensor([float("nan"), 1.0, float("-inf"), 2.0])
    assert top_k_indices(scores, 2).tolist() == [1, 3]
    # NaN ranks with -inf; the tie between them goes to the lower index.
    assert top_k_indices(scores, 3).tolist() == [0, 1, 3]
    with pytest.raises(ValueError):
        top_k_indices(torch.zeros(3), 4)


@pytest.mark.parametrize(
    "ratio, layers, expected",
    [(0.2, 32, 0.22), (0.4, 32, 0.44), (0.2, 40, 0.22), (0.4, 40, 0.43), (0.0, 32, 0.0)],
)
def test_layer_ratio_spec_table(ratio, layers, expected):
    assert layer_ratio(ratio, layers, 3) == expected


def test_layer_ratio_edge_cases():
    assert layer_ratio(0.4, 32, 0) == 0.4
    assert layer_ratio(0.95, 32, 3) == 1.0  # capped
    with pytest.raises(ValueError):
        layer_ratio(0.4, 3, 3)


@pytest.mark.parametrize(
    "heads, ratio, kept",
    [(32, 0.22, 25), (32, 0.44, 18), (40, 0.22, 32), (40, 0.43, 23), (32, 0.0, 32), (4, 1.0, 1)],
)
def test_num_kept_heads_spec_table(heads, ratio, kept):
    assert num_kept_heads(heads, ratio) == kept


@pytest.mark.parametrize(
    "width, ratio, kept",
    [(11008, 0.44, 6208), (11008, 0.22, 8640), (13824, 0.43, 7936), (13824, 0.22, 10816),
     (20480, 0.43, 11712), (20480, 0.22, 16000), (14336, 0.44, 8064), (14336, 0.22, 11200)],
)
def test_num_kept_channels_spec_table(width, ratio, kept):
    assert num_kept_channels(width, ratio, 64) == kept
    assert kept % 64 == 0


def test_num_kept_channels_rounding_edges():
    assert num_kept_channels(11008, 0.44, 1) == 11008 - 4843  # no rounding
    assert num_kept_channels(100, 0.1, 64) == 100  # rounded-up count capped at the width
    assert num_kept_channels(11008, 1.0, 64) == 64  # at least one channel, then rounded
    assert num_kept_channels(10, 1.0, 1) == 1
    assert num_kept_channels(11008, 0.0, 64) == 11008


def test_kept_heads_to_channels():
    out = kept_heads_to_channels(torch.tensor([0, 2]), 3)
    assert out.tolist() == [0, 1, 2, 6, 7, 8]
    assert kept_heads_to_channels(torch.tensor([], dtype=torch.long), 4).numel() == 0


def test_flap_allocation_hand_example_mlp_only():
    # One layer, costs 1: prune the 2 lowest of 4 at ratio 0.5.
    heads, channels = flap_allocation([], 1, [torch.tensor([3.0, 0.0, 2.0, 1.0])], 0.5, 1.0, 1.0)
    assert heads == [] and channels == [2]
    assert flap_allocation([], 1, [torch.arange(4.0)], 0.0, 1.0, 1.0) == ([], [4])
    assert flap_allocation([], 1, [torch.arange(4.0)], 1.0, 1.0, 1.0) == ([], [1])


def test_flap_allocation_weights_heads_by_cost():
    # Layer has 2 heads of 2 channels (cost 5 each) and 6 MLP channels (cost 1): total 16.
    attn = [torch.tensor([0.0, 0.0, 10.0, 10.0])]  # standardised head means: -0.866, +0.866
    mlp = [torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])]  # standardised: -1.34 ... +1.34
    # Ascending pool: ch0 (-1.34, cost 1), ch1 (-0.80, 1), head0 (-0.87 < -0.80, 5) ...
    # order: ch0(1) head0(6) ch1(7) ch2(8) ...; ratio 0.4 -> target 6.4 -> prune ch0, head0, ch1.
    heads, channels = flap_allocation(attn, 2, mlp, 0.4, 5.0, 1.0)
    assert heads == [1] and channels == [4]


def test_flap_allocation_standardises_channels_before_head_mean():
    # Channels [0, 10 | 1, 11]: head means 5 and 6, channel std 5.80, so the
    # standardised head means are only -/+0.086. (Standardising the head means
    # themselves would give -/+0.707 and put head 0 before MLP channel 1.)
    attn = [torch.tensor([0.0, 10.0, 1.0, 11.0])]
    mlp = [torch.arange(4.0)]  # standardised: -1.16, -0.39, 0.39, 1.16
    # Unit costs 1, total 6, ratio 0.3: target 1.8, reached by the 2 lowest units.
    heads, channels = flap_allocation(attn, 2, mlp, 0.3, 1.0, 1.0)
    assert heads == [2] and channels == [2]


def test_flap_allocation_cost_share_and_layer_preference():
    g = _gen(2)
    # Layer 0: right-skewed scores (most units below the layer mean, standardised < 0);
    # layer 1: left-skewed (most units above the mean). Same scale otherwise.
    base = torch.rand(1024, generator=g).pow(4)
    mlp = [base * 7.0, -base * 3.0 + 10.0]
    # Heads: layer 0 has one strong head among weak ones, layer 1 one weak among strong.
    attn = [
        torch.tensor([0.0] * 7 + [10.0]).repeat_interleave(16),
        torch.tensor([0.0] + [10.0] * 7).repeat_interleave(16),
    ]
    head_cost, channel_cost, ratio = 40.0, 3.0, 0.4
    heads, channels = flap_allocation(attn, 8, mlp, ratio, head_cost, channel_cost)
    pruned_cost = sum((8 - h) * head_cost for h in heads)
    pruned_cost += sum((1024 - c) * channel_cost for c in channels)
    total = 2 * (8 * head_cost + 1024 * channel_cost)
    # The prefix stops at the first unit that reaches the target: overshoot < one head.
    assert ratio * total <= pruned_cost < ratio * total + head_cost
    assert channels[0] < channels[1]
    assert heads[0] < heads[1]


def test_flap_allocation_channel_multiple():
    _, channels = flap_allocation([], 1, [torch.arange(100.0)], 0.5, 1.0, 1.0, channel_multiple=8)
    assert channels == [56]


# --------------------------------------------------------------------------- history


def test_position_buckets():
    pos = torch.tensor([0, 1, 15, 16, 100, 5000])
    assert position_buckets(pos, 16, 8).tolist() == [0, 0, 0, 1, 6, 7]
    assert position_buckets(pos, 1, 1024).tolist() == [0, 1, 15, 16, 100, 1023]
    assert position_buckets(pos, 16, 1).tolist() == [0] * 6


def test_fuse_hand_example():
    pb = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    hs = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
    # F = (pb^2 + hs^2) / (pb + hs) up to the 1e-6 in the denominator.
    expected = torch.tensor([1.0 + 2.0, 10.0 / 4.0 + 4.0])
    out = fuse_probe_with_history(pb, hs)
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fuse_limits_and_bf16():
    g = _gen(3)
    pb = torch.rand(5, 7, generator=g) + 0.5
    zeros = torch.zeros(5, 7)
    # History 0 -> probe (alpha = pb / (pb + 1e-6)); probe 0 -> exactly history.
    torch.testing.assert_close(fuse_probe_with_history(pb, zeros), pb.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(fuse_probe_with_history(zeros, pb), pb.sum(0))
    out = fuse_probe_with_history(pb.bfloat16(), pb.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pb.bfloat16().float().sum(0), rtol=1e-5, atol=1e-5)


def test_fuse_clamps_non_finite():
    pb = torch.tensor([[float("inf"), float("nan"), 1e9]])
    hs = torch.zeros(1, 3)
    out = fuse_probe_with_history(pb, hs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([FP16_MAX, 0.0, FP16_MAX]))
    assert fuse_probe_with_history(pb, hs, clamp_max=10.0)[2].item() == pytest.approx(10.0)
    with pytest.raises(ValueError):
        fuse_probe_with_history(torch.zeros(2, 3), torch.zeros(3, 3))


def test_unfused_statistic():
    pb = torch.tensor([[1.0, 2.0], [3.0, float("inf")]], dtype=torch.float16)
    out = unfused_statistic(pb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([4.0, 2.0 + FP16_MAX]))


def test_ema_update_hand_example_and_pruned_untouched():
    history = torch.full((3, 4), 10.0)
    buckets = torch.tensor([0, 0, 2])
    kept = torch.tensor([1, 3])
    sq = torch.tensor([[2.0, 4.0], [4.0, 8.0], [20.0, 0.0]])
    assert ema_update_(history, buckets, sq, kept, 0.5) == 0
    expected = torch.tensor(
        [[10.0, 0.5 * 10 + 0.5 * 3.0, 10.0, 0.5 * 10 + 0.5 * 6.0],
         [10.0, 10.0, 10.0, 10.0],  # bucket absent from the step
         [10.0, 15.0, 10.0, 5.0]]
    )
    assert torch.equal(history, expected)


def test_ema_update_matches_loop_reference():
    g = _gen(4)
    history = torch.rand(6, 10, generator=g)
    buckets = torch.randint(0, 6, (40,), generator=g)
    kept = torch.tensor([0, 3, 4, 9])
    sq = torch.rand(40, 4, generator=g)
    reference = history.clone()
    for b in buckets.unique().tolist():
        mean = sq[buckets == b].mean(0)
        reference[b, kept] = 0.99 * reference[b, kept] + 0.01 * mean
    ema_update_(history, buckets, sq, kept, 0.99)
    torch.testing.assert_close(history, reference)
    assert torch.equal(history[:, [1, 2, 5, 6, 7, 8]], reference[:, [1, 2, 5, 6, 7, 8]])


def test_ema_update_skips_non_finite_rows():
    history = torch.ones(4, 3)
    buckets = torch.tensor([0, 1, 1, 3])
    kept = torch.tensor([0, 2])
    sq = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [1.0, 1.0], [float("inf"), 1.0]])
    assert ema_update_(history, buckets, sq, kept, 0.9) == 2
    assert torch.isfinite(history).all()
    assert torch.equal(history[1], torch.ones(3)) and torch.equal(history[3], torch.ones(3))
    assert history[0].tolist() == [1.0, 1.0, 1.0]  # 0.9 + 0.1 * 1 == 1


def test_ema_update_skips_rows_overflowing_history_dtype():
    history = torch.full((1, 2), 60000.0, dtype=torch.float16)
    sq = torch.tensor([[1e6, 1.0]])
    assert ema_update_(history, torch.tensor([0]), sq, torch.tensor([0, 1]), 0.5) == 1
    assert torch.equal(history, torch.full((1, 2), 60000.0, dtype=torch.float16))


def test_ema_update_of_several_layers_equals_one_update_per_layer():
    g = _gen(5)
    history = torch.rand(5, 6, 10, generator=g)
    buckets = torch.randint(0, 6, (30,), generator=g)
    layers = torch.tensor([3, 0, 4])  # a subset, in any order
    kept = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])  # unsorted
    sq = torch.rand(3, 30, 4, generator=g)
    sq[2, 7, 1] = float("inf")  # one (layer, row) pair is skipped
    reference = history.clone()
    skipped = sum(ema_update_(reference[l], buckets, sq[n], kept[n], 0.9) for n, l in enumerate(layers))
    assert ema_update_layers_(history, layers, step_rows(buckets), sq, kept, 0.9) == skipped == 1
    torch.testing.assert_close(history, reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        ema_update_layers_(history.transpose(1, 2).contiguous().transpose(1, 2), layers,
                           step_rows(buckets), sq, kept, 0.9)


def test_ema_update_empty_step_and_bad_shapes():
    history = torch.ones(2, 2)
    empty = torch.zeros(0, dtype=torch.long)
    assert ema_update_(history, empty, torch.zeros(0, 1), torch.tensor([0]), 0.9) == 0
    assert torch.equal(history, torch.ones(2, 2))
    with pytest.raises(ValueError):
        ema_update_(history, torch.tensor([0]), torch.zeros(1, 2), torch.tensor([0]), 0.9)
    with pytest.raises(ValueError):
        ema_update_(history, torch.tensor([0]), torch.zeros(1, 1), torch.tensor([0]), 1.5)


def test_calibration_moments_match_torch_over_uneven_batches():
    g = _gen(5)
    num_buckets, channels = 4, 6
    # Large offset: the naive E[x^2] - E[x]^2 would lose digits, Chan's merge does not.
    x = torch.randn(203, channels, generator=g, dtype=torch.float64) * 3.0 + 1e4
    buckets = torch.randint(0, num_buckets - 1, (203,), generator=g)  # bucket 3 stays empty
    moments = CalibrationMoments(num_buckets, channels)
    x[50] = x[50].float().double()  # this row goes in as a float32 batch below
    for start, stop in [(0, 1), (1, 50), (50, 51), (51, 140), (140, 203)]:
        batch = x[start:stop].float() if start == 50 else x[start:stop]
        moments.update(batch, buckets[start:stop])
    for b in range(num_buckets - 1):
        rows = x[buckets == b]
        assert moments.count[b].item() == rows.shape[0]
        torch.testing.assert_close(moments.mean[b], rows.mean(0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(
            moments.variance[b], rows.var(0, unbiased=False), rtol=1e-9, atol=1e-9
        )
        torch.testing.assert_close(
            moments.sq_mean[b], (rows * rows).mean(0), rtol=1e-12, atol=1e-6
        )
    assert moments.count[3].item() == 0
    assert torch.equal(moments.variance[3], torch.zeros(channels))
    assert torch.equal(moments.mean[3], torch.zeros(channels))
    merged = moments.merged_over_buckets()
    assert merged.count == 203
    torch.testing.assert_close(merged.mean, x.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.variance, x.var(0, unbiased=False), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(merged.sq_mean, (x * x).mean(0), rtol=1e-12, atol=1e-6)
    assert moments.mean.shape == (num_buckets, channels) and merged.mean.shape == (channels,)


def test_calibration_moments_rejects_bad_shape():
    with pytest.raises(ValueError):
        CalibrationMoments(2, 3).update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------- scores


def test_channel_weight_norm_hand_example():
    w = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, -2.0]], dtype=torch.bfloat16)
    out = channel_weight_norm(w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3.0), math.sqrt(32.0)]))


def test_pp_scores_match_direct_formula():
    g = _gen(6)
    d, heads, hd = 12, 4, 5
    w = torch.randn(d, heads * hd, generator=g)
    c = torch.rand(heads * hd, generator=g)
    block = c * w.square()  # [D, H*hd]: c_k * W[i, k]^2
    norm = channel_weight_norm(w)
    torch.testing.assert_close(mlp_channel_scores(c, norm), torch.linalg.vector_norm(block, dim=0))
    direct = torch.linalg.vector_norm(block.reshape(d, heads, hd), dim=(0, 2))
    out = attention_head_scores(c, norm, heads)
    assert out.shape == (heads,)
    torch.testing.assert_close(out, direct)
    with pytest.raises(ValueError):
        attention_head_scores(c, norm, 3)


def test_wanda_sp_and_flap_scores():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-3.0, 1.0, 0.5, 2.0]])
    sq_mean = torch.tensor([4.0, 1.0, 16.0, 9.0])
    wanda = wanda_sp_channel_scores(w, sq_mean)
    torch.testing.assert_close(wanda, torch.tensor([8.0, 3.0, 4.0, 6.0]))
    torch.testing.assert_close(wanda_sp_head_scores(wanda, 2), torch.tensor([11.0, 10.0]))
    var = torch.tensor([1.0, 2.0, 4.0, 0.5])
    flap = flap_channel_scores(w, var)
    torch.testing.assert_close(flap, torch.tensor([10.0, 10.0, 2.0, 2.0]))
    torch.testing.assert_close(flap_head_scores(flap, 2), torch.tensor([10.0, 2.0]))


def test_flap_bias_compensation_replaces_pruned_inputs_by_mean():
    g = _gen(7)
    w = torch.randn(6, 10, generator=g)
    mean = torch.randn(10, generator=g)
    x = torch.randn(10, generator=g)
    pruned = torch.tensor([1, 4, 7])
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9])
    x_filled = x.clone()
    x_filled[pruned] = mean[pruned]
    out = w[:, kept] @ x[kept] + flap_bias_compensation(w, mean, pruned)
    torch.testing.assert_close(out, w @ x_filled)
    assert flap_bias_compensation(w, mean, pruned).shape == (6,)


# ------------------------------------------------------------------ numerical safety


def test_fuse_clamps_overflowed_half_precision_inputs():
    # What an fp16/bf16 overflow leaves behind: +-inf, NaN, and bf16 values
    # beyond fp16's range. Negative squares cannot occur; they count as 0.
    pb = torch.tensor([[float("inf"), float("-inf"), float("nan"), 2.0]], dtype=torch.float16)
    hs = torch.tensor([[0.0, 3e38, 1e30, -5.0]], dtype=torch.bfloat16)
    out = fuse_probe_with_history(pb, hs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([FP16_MAX, FP16_MAX, FP16_MAX, 2.0]))
    # Summed over many clamped probe rows the statistic stays finite in float32.
    many = torch.full((4096, 3), float("inf"), dtype=torch.float16)
    assert torch.isfinite(fuse_probe_with_history(many, many)).all()


def test_probe_selection_ranks_overflowed_tokens_deterministically():
    residual = torch.tensor(
        [[1.0, 1.0], [float("nan"), 0.0], [float("inf"), 0.0], [2.0, 2.0]], dtype=torch.float16
    )
    importance = token_importance(residual)
    # An infinite residual is the most important token, an undefined one the least.
    assert select_probe_tokens(importance, 2).tolist() == [2, 3]
    assert select_probe_tokens(importance, 4).tolist() == [0, 1, 2, 3]
    assert select_probe_tokens(importance, 3).tolist() == [0, 2, 3]


def test_top_k_indices_ties_are_deterministic_at_layer_width():
    # LLaMA-7B's MLP width in bf16: rounding makes ties everywhere.
    g = _gen(8)
    scores = (torch.rand(11008, generator=g) * 8).round().bfloat16()
    scores[::7] = -0.0  # -0.0 and 0.0 tie as well
    scores[1::7] = 0.0
    k = 6208
    expected = _reference_top_k(scores.float().tolist(), k)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, threads):
            torch.set_num_threads(num_threads)
            for _ in range(3):
                assert top_k_indices(scores, k).tolist() == expected
    finally:
        torch.set_num_threads(threads)


def _pp_method_one_block():
    """PP on one attention block of 4 heads x 2 channels, all on the CPU, no vLLM."""
    from vllm_pp.config import ProbePruningConfig
    from vllm_pp.methods.base import PrunableBlock, WorkerInfo
    from vllm_pp.methods.probe import ProbePruningMethod

    block = PrunableBlock(0, "attention", width=8, head_dim=2)
    config = ProbePruningConfig.from_dict({"ratio": 0.5, "skip_layers": [], "probe": {"selection": "tokens"}})
    method = ProbePruningMethod(config, [block], WorkerInfo(num_layers=1, tp_rank=0, tp_size=1,
                                                             max_model_len=128))
    method.prepare({block: torch.ones(6, 8)})
    return method, block


def _step(positions: list[int], index: int = 0):
    from vllm_pp.runtime.step import StepBatch

    n = len(positions)
    return StepBatch(index=index, num_tokens=n, max_query_len=n, positions=torch.tensor(positions),
                     query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([n]))


def test_pp_history_update_skips_and_counts_non_finite_rows():
    method, block = _pp_method_one_block()
    batch = _step([0, 1, 64, 65])  # buckets 0, 0, 1, 1 (64 positions per bucket)
    activations = torch.ones(4, 8, dtype=torch.float16)
    activations[2, 3] = float("inf")  # overflowed in the block: bucket 1's update is not finite
    method.update(block, batch, torch.arange(8), activations)
    method.end_step(batch)
    history = method.history[block]
    assert method.skipped_history_rows == 1
    assert torch.isfinite(history).all()
    assert torch.equal(history[1], torch.zeros(8))  # left as it was
    torch.testing.assert_close(history[0], torch.full((8,), 0.01))  # (1 - 0.99) * 1^2
    activations[0, 0] = float("nan")
    method.update(block, batch, torch.arange(8), activations)
    method.end_step(batch)
    assert method.skipped_history_rows == 3 and torch.isfinite(history).all()


@pytest.mark.parametrize("pending_limit", [None, 1])
def test_pp_history_updates_deferred_to_the_step_end_equal_immediate_ones(
    monkeypatch, tmp_path, pending_limit
):
    """Batched at end_step (or whenever the pending activations pass the limit) as per block."""
    from vllm_pp.config import ProbePruningConfig
    from vllm_pp.methods import probe as probe_module
    from vllm_pp.methods.base import PrunableBlock, WorkerInfo

    if pending_limit is not None:
        monkeypatch.setattr(probe_module, "PENDING_UPDATE_BYTES", pending_limit)
    blocks = [PrunableBlock(layer, kind, 8, 2 if kind == "attention" else 1)
              for layer in range(3) for kind in ("attention", "mlp")]
    config = ProbePruningConfig(ratio=0.5, skip_layers=[])
    method = probe_module.ProbePruningMethod(
        config, blocks, WorkerInfo(num_layers=3, tp_rank=0, tp_size=1, max_model_len=128))
    g = _gen(6)
    for block in blocks:
        method.history[block].copy_(torch.rand(2, 8, generator=g))
    reference = {block: method.history[block].clone() for block in blocks}
    # Steps of different sizes: the stacking buffer is reused, grown, and used in part.
    for index, positions in enumerate([[0, 1, 64, 65, 66], [2, 67, 68, 69, 70, 71, 72, 3], [73]]):
        batch = _step(positions, index=index)
        for block in blocks:
            channels = torch.randperm(8, generator=g)[:4]  # slot order
            activations = torch.randn(len(positions) + 1, 4, generator=g)  # one padding row
            method.update(block, batch, channels, activations)
            ema_update_(reference[block], torch.tensor(positions) // 64,
                        activations[:-1].square(), channels, config.history.ema_momentum)
        method.end_step(batch)
        for block in blocks:
            torch.testing.assert_close(method.history[block], reference[block], rtol=0, atol=0)
    # Each block's history is a view of one stacked tensor; a shard saves and reloads them all.
    from vllm_pp.storage.history_shards import load_history_shard, save_history_shard

    save_history_shard(tmp_path, method.worker.shard_owner, method.history_tensors(), method.history_layout(),
                       round_index=1, steps=0)
    saved, _ = load_history_shard(tmp_path, method.worker.shard_owner, method.history_layout(), 1)
    for block in blocks:
        assert torch.equal(saved[f"layers.{block.layer_index}.{block.kind}.history"],
                           method.history[block])


def test_pp_decision_with_overflowed_probe_is_finite_and_deterministic():
    from vllm_pp.methods.base import Probe

    method, block = _pp_method_one_block()
    batch = _step([0, 1, 2, 3])
    residual = torch.tensor([[1.0], [5.0], [1.0], [1.0]])  # token 1 is the probe
    probe_out = torch.tensor([[0.0, 0.0, float("inf"), 1.0, float("nan"), 0.0, 3.0, 3.0]],
                             dtype=torch.float16)
    def probe(rows):
        return probe_out[: rows.numel()]

    decisions = [method.decide(block, batch, residual, Probe(probe)).tolist() for _ in range(2)]
    # Half of 4 heads kept: head 1 (clamped inf) and head 3 (3, 3) beat head 2 (NaN -> 0) and head 0.
    assert decisions == [[1, 3], [1, 3]]


@pytest.mark.parametrize(("setting", "computed", "decode_only", "probed"), [
    (True, True, True, [0, 1, 2, 3]),  # attention on every head: every token, for a copy
    (True, False, True, [2]),  # the block runs for its probe: the strided token
    (True, True, False, [2]),  # a prefill step
    (False, True, True, [2]),
])
def test_pp_probes_every_decode_token_the_step_computed_when_asked(setting, computed, decode_only, probed):
    from vllm_pp.config import ProbePruningConfig
    from vllm_pp.methods.base import Probe, PrunableBlock, StepBatch, WorkerInfo
    from vllm_pp.methods.probe import ProbePruningMethod

    block = PrunableBlock(0, "attention", width=8, head_dim=2)
    config = ProbePruningConfig.from_dict(
        {"ratio": 0.5, "skip_layers": [], "probe": {"selection": "strided", "every_decode_token": setting}})
    method = ProbePruningMethod(config, [block], WorkerInfo(num_layers=1, tp_rank=0, tp_size=1, max_model_len=128))
    method.prepare({block: torch.ones(6, 8)})
    asked = []

    def probe(rows):
        asked.extend(rows.tolist())
        return torch.ones(rows.numel(), 8)

    # Four requests decoding one token each, or one request prefilling four.
    batch = StepBatch(index=0, num_tokens=4, max_query_len=1 if decode_only else 4,
                      positions=torch.tensor([5, 9, 7, 3] if decode_only else [0, 1, 2, 3]),
                      query_start_loc=torch.tensor([0, 1, 2, 3, 4] if decode_only else [0, 4]),
                      seq_lens=torch.tensor([6, 10, 8, 4] if decode_only else [4]))
    method.decide(block, batch, torch.ones(4, 6), Probe(probe, every_row_computed=computed))
    assert asked == probed
