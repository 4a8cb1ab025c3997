"""Calibration files of true dense statistics, computed by the independent reference."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.reference_model import ReferenceModel
from helpers.reference_probe_pruning import calibration_statistics


def write_reference_calibration(model: ReferenceModel, model_dir: Path, out: Path, lengths: tuple[int, ...]) -> None:
    """Statistics over seeded random windows of ``lengths``, in `vllm-pp calibrate`'s format.

    Distinct lengths give unequal counts per position.
    """
    from transformers import AutoConfig

    from vllm_pp.storage.statistics import model_identity, save_statistics

    generator = torch.Generator().manual_seed(0)
    vocab = model.config["vocab_size"]
    windows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    metadata = {
        "kind": "calibration",
        "model": model_identity(AutoConfig.from_pretrained(model_dir)),
        "tensor_parallel_size": 1,
        "seq_len": max(lengths),
        "num_samples": len(windows),
        "seed": 0,
        "text": "random token windows",
    }
    save_statistics(out, calibration_statistics(model, windows), metadata)
