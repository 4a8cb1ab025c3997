"""Calibration files of true dense statistics, computed by the independent reference."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.reference_model import ReferenceModel
from helpers.reference_probe_pruning import calibration_statistics


def write_reference_calibration(
    model: ReferenceModel, model_dir: Path, out: Path, lengths: tuple[int, ...], tp_size: int = 1
) -> None:
    """Statistics over seeded random windows of ``lengths``, in `vllm-pp calibrate`'s format.

    Distinct lengths give unequal counts per position. With ``tp_size`` > 1 each
    rank's tensors hold its contiguous shard of the channels (``count`` whole).
    """
    from transformers import AutoConfig

    from vllm_pp.storage.statistics import model_identity, save_statistics

    generator = torch.Generator().manual_seed(0)
    vocab = model.config["vocab_size"]
    windows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    metadata = {
        "kind": "calibration",
        "model": model_identity(AutoConfig.from_pretrained(model_dir)),
        "tensor_parallel_size": tp_size,
        "seq_len": max(lengths),
        "num_samples": len(windows),
        "seed": 0,
        "text": "random token windows",
    }
    tensors = {}
    for name, value in calibration_statistics(model, windows).items():  # layers.{l}.{kind}.rank0.{stat}
        shards = [value] * tp_size if name.endswith(".count") else value.chunk(tp_size, dim=-1)
        for rank, shard in enumerate(shards):
            tensors[name.replace(".rank0.", f".rank{rank}.")] = shard.clone()
    save_statistics(out, tensors, metadata)
