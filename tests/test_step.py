"""The per-step batch view built from vLLM's attention metadata."""

import types

import torch
from vllm_pp.step import StepTracker


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
