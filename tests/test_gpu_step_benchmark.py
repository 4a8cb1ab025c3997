"""benchmarks/gpu_step.py runs the runtime on a small stack on the CPU (its CUDA run needs an accelerator)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_step_benchmark_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    command = [sys.executable, str(BENCHMARKS / "gpu_step.py"), "--device", "cpu", "--dtype", "float32",
               "--shape", "tiny", "--tokens", "1", "64", "--repeats", "1", "--capturable", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["engines"]) == {"dense", "pp-every-step", "pp-reuse", "static", "pp-reuse-gathered"}
    for engine, runs in results["engines"].items():
        assert set(runs) == {"1", "64"}
        for run in runs.values():
            # The capturable path waits for the device nowhere, deciding or not.
            assert run["syncs_per_step"] == 0, (engine, run)
            assert run["eager_ms"] > 0 and run["speedup_eager"] > 0
            assert "graphed_ms" not in run  # CUDA only
    # Packed copies of the kept rows of the pruned layer (1 of 2).
    pp = results["engines"]["pp-every-step"]["1"]
    assert 0 < pp["extra_weight_bytes"] < pp["stack_weight_bytes"]
    assert results["engines"]["dense"]["1"]["extra_weight_bytes"] == 0
    # Reading the kept rows in place holds their indices only.
    assert results["engines"]["pp-reuse-gathered"]["1"]["extra_weight_bytes"] < pp["extra_weight_bytes"] / 10
    assert out.with_suffix(".png").stat().st_size > 0
