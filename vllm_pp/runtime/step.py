"""Building each step's :class:`~vllm_pp.methods.base.StepBatch` from vLLM's attention metadata."""

from __future__ import annotations

import torch

from vllm_pp.methods.base import StepBatch


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
