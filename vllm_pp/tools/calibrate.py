"""``vllm-pp calibrate``: record the dense model's statistics for PP, FLAP and Wanda-sp.

The model runs through vLLM with the ``calibration`` method
(vllm_pp/methods/calibration.py), which keeps every unit and records the
moments of each block's output-projection input; the file is read back by
vllm_pp/storage/calibration.py. :func:`prepare_calibration` keeps one file per
model and size in the asset cache, made on first use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vllm_pp.methods.calibration import CalibrationRecorder
from vllm_pp.storage.statistics import model_identity, save_statistics
from vllm_pp.tools.assets import cache_root, say
from vllm_pp.tools.engine import offline_engine
from vllm_pp.tools.text_data import prepare_text, random_windows, tokenize_text


def _export_statistics(model) -> dict:
    """Run on every worker: its method's exported statistics (a module-level
    function, because TP workers receive it pickled)."""
    return model.probe_pruning.method.export()



def calibrate(
    model: str,
    out: Path,
    *,
    text: Path,
    num_samples: int = 256,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    distributed_executor_backend: str | None = None,
) -> dict[str, Any]:
    """Run the dense model over calibration windows and save every block's statistics."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    windows = random_windows(tokenize_text(model, text), seq_len, num_samples, seed)
    recorder = {
        "method": CalibrationRecorder.name,
        "skip_layers": [],  # record every layer, so any skip list can use the file
        "method_options": {"max_positions": seq_len},
    }

    started = time.monotonic()
    tensors = {}
    with offline_engine(model, recorder, seq_len, batch_size,
                 tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                 distributed_executor_backend=distributed_executor_backend) as llm:
        # Only the forward passes matter: the recorder sees every block's input.
        llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                     SamplingParams(max_tokens=1, detokenize=False))
        for shard in llm.apply_model(_export_statistics):
            tensors.update(shard)
        hf_config = llm.llm_engine.model_config.hf_config
    metadata = {
        "kind": CalibrationRecorder.exports,
        "model": model_identity(hf_config),
        "tensor_parallel_size": tensor_parallel_size,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
        "text": str(text),
    }
    save_statistics(out, tensors, metadata)
    return {**metadata, "seconds": time.monotonic() - started, "out": str(out)}


def prepare_calibration(
    model: Path, *, num_samples: int, seq_len: int = 512, seed: int = 0, tensor_parallel_size: int = 1,
    dtype: str = "auto", quiet: bool = False, **settings,
) -> Path:
    """A calibration file of ``model`` on the prepared calibration text, made once and
    kept in the asset cache under a name that holds every setting that changes it."""
    name = f"{Path(model).name}-wiki{num_samples}x{seq_len}-seed{seed}-tp{tensor_parallel_size}-{dtype}"
    out = cache_root() / "calibration" / f"{name}.safetensors"
    if not out.exists():  # written atomically: present means complete
        say(f"calibrating {Path(model).name} on {num_samples} x {seq_len} tokens (once) -> {out}", quiet)
        calibrate(str(model), out, text=prepare_text(quiet=quiet).calibration, num_samples=num_samples,
                  seq_len=seq_len, seed=seed, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                  **settings)
    return out
