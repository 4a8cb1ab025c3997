"""Kill drill: ``kill -9`` a serving ``vllm serve --pp-history`` at random moments, restart it, and
measure what each crash lost of the history it learned.

Real processes only: a server under a steady completion load is killed with
SIGKILL (its process group, i.e. API server, engine core and mp workers, plus
any process matching ``also_kill``, e.g. Ray actors), restarted on the same
``--pp-history`` directory, and its start-up log is read for the round each
rank loaded. After every kill every history file on disk is read in full (a
torn file fails the drill). Per kill it reports how old the loaded round was at
the kill (``lost_seconds``) and how many served steps it lacks (``lost_steps``:
the steps of rank 0's last metrics snapshot before the kill, written every
0.2 s, minus the loaded round's; that snapshot lags the kill by up to 0.2 s of
serving, so the figure may come out a few steps low, even negative).

Used by tests/test_crash_recovery.py and tests/test_ray.py, and by
benchmarks/crash_recovery.py for a longer run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_pp.storage.history_shards import common_round, saved_rounds, shard_path
from vllm_pp.storage.statistics import read_metadata
from vllm_pp.tools.engine import launch_server, stop_server

_LOADED = re.compile(r"Probe pruning history \(rank (\d+)\): loaded round (\d+) from .* after (\d+) served steps")
_FIRST_START = re.compile(r"Probe pruning history \(rank (\d+)\): no saved round")
METRICS_INTERVAL_S = 0.2


class Load:
    """Greedy completion requests from ``threads`` threads until stopped."""

    def __init__(self, url: str, model: str, threads: int = 2, max_tokens: int = 16) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.answered = 0
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            prompt = " ".join(rng.choice(("history", "server", "crash", "round", "token")) for _ in range(24))
            body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens,
                               "temperature": 0}).encode()
            request = urllib.request.Request(self.url + "/v1/completions", body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    json.load(response)
                self.answered += 1
            except OSError:  # the server was killed under it
                self.failed += 1
                self._stop.wait(0.2)


def loaded_rounds(log_text: str) -> dict[int, tuple[int | None, int]]:
    """Per rank, the round its start-up loaded and the served steps behind it ((None, 0): none)."""
    loaded = {int(m[1]): (int(m[2]), int(m[3])) for m in _LOADED.finditer(log_text)}
    for m in _FIRST_START.finditer(log_text):
        loaded.setdefault(int(m[1]), (None, 0))
    return loaded


def check_round_files(directory: Path, tp_size: int) -> dict[int, list[int]]:
    """Every rank's rounds on disk, each file read in full (raises on a torn one)."""
    from safetensors import safe_open

    held = {}
    for rank in range(tp_size):
        held[rank] = saved_rounds(directory, rank)
        for round_index in held[rank]:
            path = shard_path(directory, rank, round_index)
            metadata = read_metadata(path)
            if metadata["round"] != round_index or metadata["tensor_parallel_rank"] != rank:
                raise RuntimeError(f"{path} holds round {metadata['round']} of rank "
                                   f"{metadata['tensor_parallel_rank']}")
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name)
    return held


def steps_served(metrics_dir: Path) -> int:
    """Steps rank 0 served since this start, from its newest snapshot (one directory per start)."""
    steps = 0
    for path in metrics_dir.glob("*.json"):
        try:
            snapshot = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str(snapshot["labels"].get("rank")) == "0":
            steps = max(steps, snapshot["steps"])
    return steps


@dataclass
class Drill:
    """The settings of one drill; :meth:`run` returns its report."""

    serve_args: list[str]  # model and flags, without --pp-history
    history: Path
    work_dir: Path  # logs and metrics snapshots
    tp_size: int = 1
    kills: int = 3
    checkpoint_seconds: float = 2.0
    serve_seconds: tuple[float, float] = (3.0, 8.0)  # a kill lands uniformly in this window
    also_kill: tuple[str, ...] = ()  # pkill -f patterns (Ray actors live outside the process group)
    seed: int = 0
    env: dict = field(default_factory=dict)
    # After this kill, delete rank 1's file of the newest round both ranks hold (when
    # they share an older one too), as a crash in the middle of its write would
    # leave it: the restart must load the older round on every rank.
    cut_short_after_kill: int | None = None

    def _start(self, index: int, metrics_dir: Path):
        log_path = self.work_dir / f"start{index}.log"
        args = [*self.serve_args, "--pp-history", str(self.history),
                "--pp-history-checkpoint-seconds", str(self.checkpoint_seconds)]
        env = {"PROBE_PRUNING_METRICS_DIR": str(metrics_dir),
               "VLLM_PP_METRICS_INTERVAL": str(METRICS_INTERVAL_S), **self.env}
        process, url = launch_server(args, env=env, log_path=log_path)
        return process, url, log_path

    def _kill(self, process) -> float:
        os.killpg(process.pid, signal.SIGKILL)
        for pattern in self.also_kill:
            subprocess.run(["pkill", "-9", "-f", pattern], check=False)
        killed_at = time.time()
        process.wait()
        return killed_at

    def run(self, keep_last_running: bool = False) -> dict:
        """Kill ``kills`` times, restart after each; the report. With ``keep_last_running``
        the last start stays up and is returned as ``report["server"]`` = (process, url)."""
        rng = random.Random(self.seed)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        report = {"kills": [], "checkpoint_seconds": self.checkpoint_seconds, "tp_size": self.tp_size}
        before: dict | None = None  # what the previous kill left
        for index in range(self.kills + 1):
            metrics_dir = self.work_dir / f"metrics{index}"
            process, url, log_path = self._start(index, metrics_dir)
            loaded = loaded_rounds(log_path.read_text())
            if before is not None:
                before["loaded"] = {rank: loaded.get(rank) for rank in range(self.tp_size)}
                rounds = {r for r, _ in filter(None, before["loaded"].values())}
                expected = _newest_common(before["held_after_kill"])
                if rounds != {expected} or None in before["loaded"].values():
                    raise RuntimeError(f"after kill {index}: ranks loaded {before['loaded']}, "
                                       f"expected round {expected} on every rank; see {log_path}")
                round_index = expected
                steps = before["loaded"][0][1]
                before["lost_steps"] = before["steps_at_kill"] - steps
                saved_at = (read_metadata(shard_path(self.history, 0, round_index))["saved_at"]
                            if round_index is not None else None)
                before["lost_seconds"] = None if saved_at is None else before["killed_at"] - saved_at
                report["kills"].append(before)
            if index == self.kills:
                report["last_start_loaded"] = loaded
                if keep_last_running:
                    report["server"] = (process, url)
                else:
                    stop_server(process)
                return report
            loaded_steps = loaded.get(0, (None, 0))[1]
            model = _served_model(url)
            with Load(url, model) as load:
                time.sleep(rng.uniform(*self.serve_seconds))
                served = steps_served(metrics_dir)
                killed_at = self._kill(process)
            held = check_round_files(self.history, self.tp_size)
            before = {
                "kill": index + 1,
                "killed_at": killed_at,
                "steps_at_kill": loaded_steps + served,
                "requests_answered": load.answered,
                "held_after_kill": held,
            }
            shared = sorted(set(held.get(0, [])) & set(held.get(1, [])))
            if self.cut_short_after_kill == index + 1 and len(shared) >= 2:
                # The newest round both ranks finished, taken from rank 1 only.
                shard_path(self.history, 1, shared[-1]).unlink()
                before["cut_short"] = {"rank": 1, "round": shared[-1]}
                before["held_after_kill"] = check_round_files(self.history, self.tp_size)
        return report


def _newest_common(held: dict[int, list[int]]) -> int | None:
    return common_round([held[rank] for rank in sorted(held)])


def _served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]
