"""FLAP's and Wanda-sp's decisions inside vLLM against the independent reference.

Both decide once, from calibration: vLLM serves a tiny model with each (on a
calibration file of true dense statistics computed by the reference), and the
kept units of every pruned block, and FLAP's bias compensation, are read back
from the worker and compared with ``helpers/reference_baselines.py``, which
computes them from the file and the checkpoint alone. Full-batch probing, which
decides every step, is checked in test_probe_pruning_agreement.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.calibration_files import write_reference_calibration
from helpers.engines import vllm_engine
from helpers.reference_baselines import ReferenceBaselines
from helpers.reference_model import ReferenceModel
from helpers.reference_probe_pruning import Settings

SETTINGS = Settings(
    ratio=0.5,  # 6 layers, 1 skipped: r' = 0.6
    probe_ratio=0.25,  # unused by the static methods
    skip_layers=(0,),
    channel_multiple=16,
)
CALIBRATION_LENGTHS = (18, 13, 9)


def _decisions(model) -> dict:
    """Each pruned block's kept units and output correction (None without one), on this worker."""
    method = model.probe_pruning.method
    decisions = {}
    for block, kept in method.kept.items():
        correction = method.output_correction(block, kept)
        decisions[block.layer_index, block.kind] = (
            kept.tolist(), None if correction is None else correction.double().cpu())
    return decisions


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_static_baseline_decisions_equal_the_reference(method, family, random_models, tmp_path):
    path = random_models[family]
    model = ReferenceModel(path)
    calibration = tmp_path / "calibration.safetensors"
    write_reference_calibration(model, path, calibration, CALIBRATION_LENGTHS)
    config = {"probe_pruning": {
        "ratio": SETTINGS.ratio, "method": method, "calibration": str(calibration),
        "skip_layers": list(SETTINGS.skip_layers), "channel_multiple": SETTINGS.channel_multiple,
    }}
    with vllm_engine(path, in_process=True, additional_config=config) as llm:
        (served,) = llm.apply_model(_decisions)
    reference = ReferenceBaselines(model, SETTINGS, calibration)
    if method == "flap":
        kept, bias = reference.flap()
    else:
        kept, bias = reference.wanda_sp(), {}
    assert set(served) == set(kept)
    for block, (served_kept, served_bias) in served.items():
        assert served_kept == kept[block], (block, served_kept, kept[block])
        if method == "flap":
            assert torch.allclose(served_bias, bias[block], rtol=1e-4, atol=1e-6), block
        else:
            assert served_bias is None, block
    # FLAP's global allocation keeps different counts in different blocks.
    counts = {len(units) for (_, kind), units in kept.items() if kind == "mlp"}
    assert (len(counts) > 1) == (method == "flap"), counts
