"""What a server learned survives kill -9: history checkpoints while serving, loaded at restart
(vllm_pp/tools/kill_drill.py runs real servers and kills them), and a history volume that
fails while serving (full, read-only) is logged, counted on /metrics and never stops serving.

The Ray / TP=2 drill is in tests/test_ray.py, next to its cluster.
"""

import json
import subprocess
import time
import urllib.request

import pytest
from helpers.servers import metric_samples
from vllm_pp.tools.engine import stop_server
from vllm_pp.tools.kill_drill import Drill, Load, _served_model

CHECKPOINT_SECONDS = 2.0
# A round starts at the first step boundary after the interval and takes
# milliseconds to write here; a few steps of slack on this shared machine.
LOSS_BOUND_SECONDS = CHECKPOINT_SECONDS + 3.0


def _mount_tmpfs(path, size_kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_kill_9_loses_at_most_a_checkpoint_interval_and_a_failing_volume_never_stops_serving(
    random_models, tmp_path
):
    history = tmp_path / "history"
    # The history on a volume of its own, so the test can fill it and make it read-only.
    on_tmpfs = _mount_tmpfs(history, size_kib=1024)
    try:
        drill = Drill(
            serve_args=[str(random_models["llama-gqa"]), "--pp-ratio", "0.4", "--dtype", "float32",
                        "--max-model-len", "512", "--max-num-seqs", "8"],
            history=history, work_dir=tmp_path / "drill", kills=3,
            checkpoint_seconds=CHECKPOINT_SECONDS, serve_seconds=(3.0, 7.0), seed=1,
        )
        report = drill.run(keep_last_running=True)
        process, url = report.pop("server")
        try:
            kills = report["kills"]
            assert len(kills) == 3
            for kill in kills:
                # Served before each kill, loaded a complete round after it, and lost at
                # most the interval's learning (files were all read in full by the drill).
                assert kill["requests_answered"] > 0 and kill["held_after_kill"][0], kill
                (round_index, steps) = kill["loaded"][0]
                assert round_index == kill["held_after_kill"][0][-1], kill
                assert 0 <= kill["lost_seconds"] <= LOSS_BOUND_SECONDS, kill
            # Learning accumulates across crashes: each restart resumes from more steps.
            resumed = [kill["loaded"][0][1] for kill in kills]
            assert 0 < resumed[0] < resumed[1] < resumed[2], resumed
            _volume_failures(url, history, on_tmpfs)
        finally:
            stop_server(process)
    finally:
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(history)], check=False)
    if not on_tmpfs:
        pytest.skip("full and read-only history volumes not checked: mounting a tmpfs is not permitted here")


def _volume_failures(url: str, history, on_tmpfs: bool) -> None:
    """Checkpoints failing while serving: counted, logged, and serving goes on."""
    if not on_tmpfs:
        return
    model = _served_model(url)

    def counted(outcome: str) -> float:
        # Absent (0) until the worker's first snapshot.
        return sum(metric_samples(url, "vllm:probe_pruning_history_checkpoints_total", outcome=outcome))

    with Load(url, model) as load:
        assert _wait_for(lambda: counted("written") > 0)
        # Full: a filler takes what is left of the volume.
        subprocess.run(["dd", "if=/dev/zero", f"of={history / 'filler'}", "bs=64k"], capture_output=True)
        failed = counted("failed")
        assert _wait_for(lambda: counted("failed") > failed), "a full volume was not counted"
        (history / "filler").unlink()
        written = counted("written")
        assert _wait_for(lambda: counted("written") > written), "writes did not resume"
        # Read-only.
        subprocess.run(["mount", "-o", "remount,ro", str(history)], check=True)
        failed = counted("failed")
        assert _wait_for(lambda: counted("failed") > failed), "a read-only volume was not counted"
        subprocess.run(["mount", "-o", "remount,rw", str(history)], check=True)
        written = counted("written")
        assert _wait_for(lambda: counted("written") > written)
        answered = load.answered
        assert _wait_for(lambda: load.answered > answered)  # serving never stopped
    assert load.failed == 0
    body = json.dumps({"model": model, "prompt": "still serving", "max_tokens": 4}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.load(response)["usage"]["completion_tokens"] == 4
