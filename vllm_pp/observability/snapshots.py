"""The snapshot files through which workers' pruning metrics reach the API server.

Each worker writes its snapshot (a JSON object, :func:`vllm_pp.observability.worker.build_snapshot`)
atomically into one directory, named by ``PROBE_PRUNING_METRICS_DIR``; the API
server's collector (:mod:`vllm_pp.observability.server`) reads those of live
workers. Writer and reader are in different processes, possibly started by
different parents: the directory and this format are all they share.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

# Not VLLM_-prefixed: the API server sets it after vLLM validated its environment,
# and a later engine started from there would warn about (or, with
# --fail-on-environ-validation, refuse) an unknown VLLM_* variable.
DIR_ENV = "PROBE_PRUNING_METRICS_DIR"
SNAPSHOT_VERSION = 1


def write_snapshot(directory: str, snapshot: dict) -> str:
    """Write atomically (temp file, rename): a reader sees the old or the new file."""
    os.makedirs(directory, exist_ok=True)
    labels = snapshot["labels"]
    name = f"engine{labels.get('engine')}-rank{labels.get('rank')}-pid{snapshot['pid']}.json"
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(snapshot, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def read_snapshots(directory: str) -> list[dict]:
    """The snapshots of live workers in ``directory`` (unreadable files skipped)."""
    snapshots = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                snapshot = json.load(f)
        except (OSError, ValueError):
            continue
        if snapshot.get("version") != SNAPSHOT_VERSION:
            continue
        if not _pid_alive(int(snapshot.get("pid", 0))):  # a worker that is gone
            continue
        snapshots.append(snapshot)
    return snapshots
