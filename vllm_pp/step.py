"""The per-step view of a vLLM batch that pruning decisions are made on."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    """What the scheduler put into one forward pass, as seen by one worker.

    vLLM flattens a step into ``num_tokens`` tokens: request r owns tokens
    ``query_start_loc[r]:query_start_loc[r+1]`` (decode requests first, then
    prefill chunks, no padding between them). Tensors stay on the model's
    device; the ints come from the metadata's host-side fields, so building
    this view never synchronises with the device.
    """

    index: int  # forward passes with metadata seen so far by this worker
    num_tokens: int
    max_query_len: int
    positions: torch.Tensor  # [num_tokens] absolute position in its sequence
    query_start_loc: torch.Tensor  # [num_requests + 1] int32
    seq_lens: torch.Tensor  # [num_requests] context + this step's tokens

    @property
    def num_requests(self) -> int:
        return self.query_start_loc.shape[0] - 1

    @property
    def is_decode_only(self) -> bool:
        """Every request contributes exactly one token (no speculative decoding)."""
        return self.max_query_len == 1

    @property
    def query_lens(self) -> torch.Tensor:  # [num_requests]
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def context_lens(self) -> torch.Tensor:  # [num_requests] tokens already in the KV cache
        return self.seq_lens - self.query_lens

    @property
    def is_decode(self) -> torch.Tensor:  # [num_requests] bool
        return self.query_lens == 1

    # Computed once per step (cached on the instance), read by every layer.
    @functools.cached_property
    def request_of_token(self) -> torch.Tensor:  # [num_tokens] int64
        return torch.repeat_interleave(
            torch.arange(self.num_requests, device=self.query_start_loc.device),
            self.query_lens,
            output_size=self.num_tokens,
        )

    @functools.cached_property
    def token_seq_lens(self) -> torch.Tensor:  # [num_tokens] int32
        """Each token's sequence length up to and including it (its KV-cache context)."""
        return (self.positions + 1).to(torch.int32)


class StepTracker:
    """Holds the current step's view for every layer of one model instance.

    The model sets it at the top of each forward; layers read it. One instance
    per model object, so several engines in one process never share state.
    """

    def __init__(self) -> None:
        self.batch: StepBatch | None = None
        self.num_steps = 0

    def begin(self, metadata, positions: torch.Tensor) -> None:
        """Start a forward pass; ``metadata`` None (warm-up, profiling) means dense."""
        if metadata is None:
            self.batch = None
            return
        num_tokens = int(metadata.num_actual_tokens)
        self.batch = StepBatch(
            index=self.num_steps,
            num_tokens=num_tokens,
            max_query_len=int(metadata.max_query_len),
            positions=positions[:num_tokens],
            query_start_loc=metadata.query_start_loc,
            seq_lens=metadata.seq_lens,
        )
        self.num_steps += 1
