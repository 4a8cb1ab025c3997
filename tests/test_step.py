"""The per-step batch view built from vLLM's attention metadata."""

import types

import torch
from vllm_pp.runtime.step import StepTracker


def test_step_view_of_a_mixed_step():
    # One decode request (context 5) first, then prefill chunks of 9 and 3 tokens;
    # the positions tensor is padded past the 13 real tokens.
    metadata = types.SimpleNamespace(
        num_actual_tokens=13,
        max_query_len=9,
        query_start_loc=torch.tensor([0, 1, 10, 13], dtype=torch.int32),
        seq_lens=torch.tensor([6, 9, 3]),
    )
    positions = torch.cat([torch.tensor([5]), torch.arange(9), torch.arange(3), torch.zeros(3, dtype=torch.long)])
    tracker = StepTracker()
    tracker.begin(None, positions)
    assert tracker.batch is None  # warm-up / profiling: dense
    tracker.begin(metadata, positions)
    batch = tracker.batch
    assert batch.index == 0 and batch.num_tokens == 13 and batch.num_requests == 3
    assert batch.positions.tolist() == [5, *range(9), *range(3)]
    assert batch.query_lens.tolist() == [1, 9, 3]
    assert batch.context_lens.tolist() == [5, 0, 0]
    assert batch.is_decode.tolist() == [True, False, False] and not batch.is_decode_only
    assert batch.request_of_token.tolist() == [0] + [1] * 9 + [2] * 3
    tracker.begin(metadata, positions)
    assert tracker.batch.index == 1


def test_attention_probe_rows_exact_or_among_probe_tokens():
    """ProbePruning.attend wires q/k/v, positions and requests into the probe."""
    from vllm_pp.config import ProbePruningConfig
    from vllm_pp.runtime.attention import AllHeadsAttention
    from vllm_pp.runtime.pruning import ProbePruning

    # Two fresh prefill requests of 4 and 3 tokens; 4 query heads over 2 KV heads.
    metadata = types.SimpleNamespace(
        num_actual_tokens=7, max_query_len=4,
        query_start_loc=torch.tensor([0, 4, 7], dtype=torch.int32), seq_lens=torch.tensor([4, 3]),
    )
    tracker = StepTracker()
    tracker.begin(metadata, torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 4 * 8, generator=g), torch.randn(7, 2 * 8, generator=g), torch.randn(7, 2 * 8, generator=g)
    # What vLLM's attention computes for these fresh requests (causal, per request).
    heads_out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[s:e].view(-1, 4, 8).transpose(0, 1),
            k[s:e].view(-1, 2, 8).repeat_interleave(2, dim=1).transpose(0, 1),
            v[s:e].view(-1, 2, 8).repeat_interleave(2, dim=1).transpose(0, 1),
            is_causal=True, scale=0.5,
        ).transpose(0, 1).reshape(e - s, 32)
        for s, e in ((0, 4), (4, 7))
    ])

    def probe(attention: str):
        state = types.SimpleNamespace(
            config=ProbePruningConfig.from_dict({"ratio": 0.4, "probe": {"attention": attention}}),
            steps=tracker,
            attention=types.SimpleNamespace(attend=lambda layer, q, k, v, batch: AllHeadsAttention(heads_out)),
        )
        return ProbePruning.attend(state, None, q, k, v, head_dim=8, scale=0.5).probe_rows

    rows = torch.tensor([1, 2, 5])
    assert torch.equal(probe("exact")(rows), heads_out[rows])
    # Probing every token of fresh requests, the paper's probe-only attention is exact.
    everything = torch.arange(7)
    torch.testing.assert_close(probe("probe-only")(everything), heads_out)
    # A subset attends among itself only: token 2 sees token 1 but not token 0.
    subset = probe("probe-only")(rows)
    assert not torch.allclose(subset[1], heads_out[2])
    torch.testing.assert_close(subset[0], probe("probe-only")(torch.tensor([1]))[0])
