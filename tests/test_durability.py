"""Statistics files (vllm_pp/statistics.py) survive a writer killed mid-write, and
loading one never runs code from it."""

import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.storage.statistics import ShardOwner, load_statistics, read_metadata, save_statistics

TENSOR = "layers.0.mlp.rank0.sq_mean"
# 32 MB: one save (write, fsync, rename) takes ~0.1 s here, a window a kill can land in.
NUMEL = 8 << 20

# Saves versions start, start+1, ... until killed; each file's tensor is filled
# with its version, so a torn file shows as a mix or a short read.
WRITER = f"""
import sys, torch
from vllm_pp.storage.statistics import save_statistics
path, version = sys.argv[1], int(sys.argv[2])
while True:
    print("saving", version, flush=True)
    save_statistics(path, {{"{TENSOR}": torch.full(({NUMEL},), float(version))}},
                    {{"kind": "calibration", "version": version}})
    print("saved", version, flush=True)
    version += 1
"""


def _version_of(path) -> int:
    """The complete file's version; fails on a torn or inconsistent file."""
    version = read_metadata(path)["version"]
    with safe_open(str(path), framework="pt") as f:
        tensor = f.get_tensor(TENSOR)
    assert tensor.numel() == NUMEL and torch.all(tensor == version), f"torn file at version {version}"
    return version


def test_killed_writer_leaves_the_previous_or_the_new_file(tmp_path):
    path = tmp_path / "stats.safetensors"
    save_statistics(path, {TENSOR: torch.zeros(NUMEL)}, {"kind": "calibration", "version": 0})
    # save_statistics' temporary file, and the one safetensors itself writes and
    # renames into it (Rust's tempfile crate: ".tmp" and 6 random characters).
    temp_name = re.compile(rf"^(\.{re.escape(path.name)}\..+\.tmp|\.tmp\w{{6}})$")
    rng = random.Random(0)
    killed_mid_write = 0
    for _ in range(4):
        start = _version_of(path) + 1
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start)],
                                  stdout=subprocess.PIPE, text=True)
        # Let it replace the file at least once, then kill it at a random moment
        # of a later save.
        for line in writer.stdout:
            if line.split() == ["saving", str(start + 1)]:
                break
        time.sleep(rng.uniform(0.0, 0.15))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        saved = [int(line.split()[1]) for line in writer.stdout if line.startswith("saved")]
        last_saved = max(saved, default=start)  # start was saved before "saving start+1"
        # The rename either happened (the new file) or not (the previous one).
        assert _version_of(path) in (last_saved, last_saved + 1)
        leftovers = [p.name for p in tmp_path.iterdir() if p != path]
        # A killed writer cannot remove its temporary files, but they are hidden
        # and never named *.safetensors: nothing that looks for statistics files
        # picks them up.
        assert all(temp_name.match(name) for name in leftovers), leftovers
        killed_mid_write += len(leftovers) > 0
        for name in leftovers:
            (tmp_path / name).unlink()
    # Otherwise every kill landed between saves and the test showed nothing.
    assert killed_mid_write >= 1


class _Payload:
    """Unpickling it creates ``marker``: code from the file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_loading_never_runs_code_from_the_file(tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "calibration.safetensors"
    with open(path, "wb") as f:
        if writer == "pickle":
            pickle.dump(_Payload(marker), f)
        else:
            torch.save({"weights": _Payload(marker)}, f)
    for load in (read_metadata,
                 lambda p: load_statistics(p, kind="calibration", owner=ShardOwner({}, 1, 0))):
        with pytest.raises(ProbePruningConfigError) as err:
            load(path)
        assert "is not a readable safetensors file (truncated or corrupted?)" in str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()
    # The payload is live: a pickle loader would have run it.
    with open(path, "rb") as f:
        if writer == "pickle":
            pickle.load(f)
        else:
            torch.load(f, weights_only=False)
    assert marker.exists()


def test_next_save_removes_a_killed_writers_temporary_file(tmp_path):
    path = tmp_path / "stats.safetensors"
    stale = tmp_path / f".{path.name}.abc123.tmp"
    stale.write_bytes(b"half of a file")
    other = tmp_path / ".tmpkeep1"  # not ours: left alone
    other.write_bytes(b"x")
    save_statistics(path, {"t": torch.zeros(2)}, {"kind": "calibration"})
    assert not stale.exists() and other.exists() and path.exists()
