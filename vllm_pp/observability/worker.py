"""Probe-pruning metrics inside a worker: counters, snapshots, the periodic log line.

* :class:`BlockStats` / :class:`PruningStats`: plain Python counters that
  :class:`vllm_pp.runtime.pruning.BlockPruner` bumps on every step. Everything
  they count is known on the host (kept counts are ``kept.numel()``, a shape;
  probe sizes are the probe rows' shape), so recording never synchronises with
  the device. The wall time of ``decide()`` is measured only when the block runs
  on the CPU, where every op finishes before it returns; on an accelerator it
  would be launch time. With ``VLLM_PP_PROFILE=1`` the sections of
  :mod:`vllm_pp.observability.profiling` are reported too.
* :class:`Reporter`: a daemon thread that, every ``VLLM_PP_METRICS_INTERVAL``
  seconds (default 5), writes this worker's snapshot into the snapshot
  directory (:mod:`vllm_pp.observability.snapshots`), and every
  ``VLLM_PP_LOG_INTERVAL`` seconds (default 60, 0: never) logs one INFO summary
  line. The method's history health (non-finite values, skipped rows) is read
  there, off the hot path.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from vllm_pp.observability.snapshots import DIR_ENV, SNAPSHOT_VERSION, write_snapshot

INTERVAL_ENV = "VLLM_PP_METRICS_INTERVAL"
LOG_INTERVAL_ENV = "VLLM_PP_LOG_INTERVAL"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_LOG_INTERVAL_S = 60.0


def _seconds_from_env(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


@dataclass(eq=False, slots=True)
class BlockStats:
    """Counters of one prunable block on one worker (host ints and floats only)."""

    layer: int
    kind: str
    units: int  # heads (attention) or channels (MLP) on this rank
    pruned: int = 0  # steps the block ran on kept units
    dense: int = 0  # steps the method chose to run it dense
    kept: int = 0  # kept units, summed over pruned steps
    probes: int = 0  # probe calls (decisions that ran a probe)
    probe_tokens: int = 0  # tokens those probes ran
    decide_seconds: float = 0.0  # wall time in decide(), CPU only
    timed: int = 0  # decisions whose time is in decide_seconds

    def counting(self, probe: Callable) -> Callable:
        """``probe`` counting its calls and rows (a shape: known on the host)."""

        def counted_probe(rows):
            self.probes += 1
            self.probe_tokens += rows.shape[0]
            return probe(rows)

        return counted_probe

    def as_dict(self) -> dict:
        return {
            "layer": self.layer, "block": self.kind, "units": self.units,
            "pruned": self.pruned, "dense": self.dense, "kept": self.kept,
            "probes": self.probes, "probe_tokens": self.probe_tokens,
            "decide_seconds": self.decide_seconds, "timed": self.timed,
        }


@dataclass(eq=False)
class PruningStats:
    """One worker's counters: per step and per block."""

    labels: dict  # model_name, engine, rank
    method: str = ""
    steps: int = 0  # forward passes with pruning active
    tokens: int = 0  # tokens in those passes
    blocks: list[BlockStats] = field(default_factory=list)

    def add_block(self, layer: int, kind: str, units: int) -> BlockStats:
        stats = BlockStats(layer, kind, units)
        self.blocks.append(stats)
        return stats

    def begin_step(self, num_tokens: int) -> None:
        self.steps += 1
        self.tokens += num_tokens


def build_snapshot(
    stats: PruningStats, history: dict | None = None, sections: dict | None = None,
    checkpoints: dict | None = None,
) -> dict:
    """One worker's snapshot: ``history`` from the method's ``history_health()``,
    ``sections`` from :func:`vllm_pp.observability.profiling.snapshot`,
    ``checkpoints`` the history writer's counters (``--pp-history``)."""
    return {
        "version": SNAPSHOT_VERSION,
        "time": time.time(),
        "pid": os.getpid(),
        "labels": dict(stats.labels),
        "method": stats.method,
        "steps": stats.steps,
        "tokens": stats.tokens,
        "blocks": [b.as_dict() for b in stats.blocks],
        "history": history or {},
        "sections": sections,
        "checkpoints": checkpoints,
    }


def window(current: dict, previous: dict | None) -> dict:
    """Means over the interval between two snapshots of one worker.

    ``kept_ratio[(layer, block)]`` (None when the block was not pruned in the
    interval), ``probe_size`` (tokens per probe), ``steps``, ``tokens``,
    ``probe_tokens``, ``decide_ms_per_step``.
    """
    before = {(b["layer"], b["block"]): b for b in (previous or {}).get("blocks", [])}

    def delta(block: dict, key: str) -> float:
        return block[key] - before.get((block["layer"], block["block"]), {}).get(key, 0)

    kept_ratio = {}
    probes = probe_tokens = 0
    decide_seconds = 0.0
    for b in current["blocks"]:
        pruned = delta(b, "pruned")
        kept_ratio[(b["layer"], b["block"])] = (
            delta(b, "kept") / (pruned * b["units"]) if pruned > 0 and b["units"] else None
        )
        probes += delta(b, "probes")
        probe_tokens += delta(b, "probe_tokens")
        decide_seconds += delta(b, "decide_seconds")
    steps = current["steps"] - (previous or {}).get("steps", 0)
    return {
        "kept_ratio": kept_ratio,
        "probe_size": probe_tokens / probes if probes else None,
        "probe_tokens": probe_tokens,
        "steps": steps,
        "tokens": current["tokens"] - (previous or {}).get("tokens", 0),
        "decide_ms_per_step": 1e3 * decide_seconds / steps if steps else None,
    }


def recent_means(current: dict, previous: dict | None, before: dict | None) -> dict:
    """The snapshot's ``recent`` field: kept ratios and probe size over the last
    interval with steps (``before``, the last one, is kept over idle intervals)."""
    w = window(current, previous)
    if w["steps"] == 0 and before is not None:
        return before
    return {
        "kept_ratio": [
            [layer, kind, ratio]
            for (layer, kind), ratio in w["kept_ratio"].items()
            if ratio is not None
        ],
        "probe_size": w["probe_size"],
    }


def summary_line(current: dict, previous: dict | None, seconds: float) -> str:
    """The periodic log line of one worker."""
    w = window(current, previous)
    labels = current["labels"]
    parts = [
        f"Probe pruning (rank {labels.get('rank')}, engine {labels.get('engine')}): "
        f"{w['steps']} steps, {w['tokens']} tokens in {seconds:.0f} s"
    ]
    for kind in ("attention", "mlp"):
        ratios = [r for (_, k), r in w["kept_ratio"].items() if k == kind and r is not None]
        if ratios:
            parts.append(
                f"{kind} kept {sum(ratios) / len(ratios):.1%} "
                f"(layers {min(ratios):.1%}-{max(ratios):.1%})"
            )
    if w["probe_size"] is not None:
        step_tokens = w["tokens"] / w["steps"] if w["steps"] else 0.0
        parts.append(f"probe {w['probe_size']:.1f} tokens (steps of {step_tokens:.1f} tokens)")
    if w["decide_ms_per_step"] is not None and any(b["timed"] for b in current["blocks"]):
        parts.append(f"decide {w['decide_ms_per_step']:.2f} ms/step")
    sections = current.get("sections")
    if sections:
        timed = [f"{s}={v['seconds']:.2f}s" for s, v in sections.items() if v["calls"]]
        parts.append("profile " + " ".join(timed))
    history = current.get("history") or {}
    if history.get("nonfinite_values") is not None or history.get("skipped_rows") is not None:
        parts.append(
            f"history non-finite {history.get('nonfinite_values')}, "
            f"skipped rows {history.get('skipped_rows')}"
        )
    return "; ".join(parts)


class Reporter:
    """Daemon thread writing one worker's snapshots and log lines.

    Holds the pruning state weakly: the thread ends once the model is gone.
    """

    def __init__(self, pruning, logger) -> None:
        self.directory = os.environ.get(DIR_ENV) or None
        self.interval = _seconds_from_env(INTERVAL_ENV, DEFAULT_INTERVAL_S)
        self.log_interval = _seconds_from_env(LOG_INTERVAL_ENV, DEFAULT_LOG_INTERVAL_S)
        self._pruning = weakref.ref(pruning)
        self._logger = logger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return bool(self.directory) or self.log_interval > 0

    def start(self) -> None:
        if self._thread is not None or not self.active:
            return
        self._thread = threading.Thread(
            target=self._run, name="vllm-pp-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        periods = [p for p in (self.interval if self.directory else 0, self.log_interval) if p > 0]
        tick = max(min(periods, default=0.1), 0.1)
        logged, logged_at = None, time.monotonic()
        written, written_at, recent = None, 0.0, None
        while not self._stop.wait(tick):
            pruning = self._pruning()
            if pruning is None:
                return
            now = time.monotonic()
            try:
                snapshot = pruning.metrics_snapshot()
                if self.directory and now - written_at >= self.interval - 1e-3:
                    recent = recent_means(snapshot, written, recent)
                    write_snapshot(self.directory, {**snapshot, "recent": recent})
                    written, written_at = snapshot, now
                if self.log_interval > 0 and now - logged_at >= self.log_interval - 1e-3:
                    if logged is None or snapshot["steps"] != logged["steps"]:
                        self._logger.info("%s", summary_line(snapshot, logged, now - logged_at))
                    logged, logged_at = snapshot, now
            except Exception:  # metrics must never take a worker down
                self._logger.exception("Probe pruning metrics could not be reported")
            del pruning
