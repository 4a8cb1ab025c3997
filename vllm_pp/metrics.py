"""Probe-pruning metrics: recorded in each worker, served on the API server's ``/metrics``.

Three parts:

* :class:`BlockStats` / :class:`PruningStats` (worker): plain Python counters that
  :class:`vllm_pp.pruning.BlockPruner` bumps on every step. Everything they count
  is known on the host (kept counts are ``kept.numel()``, a shape; probe sizes are
  the probe rows' shape), so recording never synchronises with the device. The
  wall time of ``decide()`` is measured only when the block runs on the CPU, where
  every op finishes before it returns; on an accelerator it would be launch time.
  With ``VLLM_PP_PROFILE=1`` the probe/scoring/selection/history-update split of
  :mod:`vllm_pp.profiling` is reported too.
* :class:`Reporter` (worker): a daemon thread that, every
  ``VLLM_PP_METRICS_INTERVAL`` seconds (default 5), writes this worker's snapshot
  as JSON, atomically, into ``PROBE_PRUNING_METRICS_DIR``, and every
  ``VLLM_PP_LOG_INTERVAL`` seconds (default 60, 0: never) logs one INFO summary
  line. The history-store health (non-finite values, skipped rows) is read here,
  off the hot path.
* :class:`SnapshotCollector` (API server): a Prometheus collector in the default
  registry, which vLLM's ``/metrics`` serves, that turns the snapshots into
  ``vllm:probe_pruning_*`` series. :func:`prepare_server_metrics` sets it up when
  the process that builds the engine config (``vllm serve``'s API server, or an
  offline ``LLM``) turns pruning on; it also picks the snapshot directory and puts
  it in the environment, which the engine core, its workers and (through vLLM's
  driver environment) Ray actors inherit.

Limits: snapshots travel through a local directory, so workers on other nodes
are not seen; with ``--api-server-count`` > 1 vLLM serves a multiprocess
registry that this collector is not part of.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

# Not VLLM_-prefixed: this process sets it after vLLM validated its environment,
# and a later engine started from here would warn about (or, with
# --fail-on-environ-validation, refuse) an unknown VLLM_* variable.
DIR_ENV = "PROBE_PRUNING_METRICS_DIR"
INTERVAL_ENV = "VLLM_PP_METRICS_INTERVAL"
LOG_INTERVAL_ENV = "VLLM_PP_LOG_INTERVAL"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_LOG_INTERVAL_S = 60.0
PREFIX = "vllm:probe_pruning_"
# Directories this module creates on its own start with this.
_AUTO_DIR_PREFIX = "vllm-pp-metrics-"
SNAPSHOT_VERSION = 1


def _seconds_from_env(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


# --------------------------------------------------------------------------- worker


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


def history_health(method) -> dict:
    """Non-finite values in the method's history and its skipped rows (None: no history).

    Reads device values (one sync each): call it off the hot path.
    """
    history = getattr(method, "history", None)
    tensors = list(history.values()) if isinstance(history, dict) else [history]
    tensors = [t for t in tensors if hasattr(t, "isfinite")]
    nonfinite = None
    if tensors:
        nonfinite = sum(int((~t.isfinite()).sum()) for t in tensors)
    try:
        skipped = getattr(method, "skipped_history_rows", None)
    except Exception:  # a broken property must not stop the reporter
        skipped = None
    if skipped is not None:
        skipped = int(skipped.item() if hasattr(skipped, "item") else skipped)
    return {"nonfinite_values": nonfinite, "skipped_rows": skipped}


def build_snapshot(
    stats: PruningStats, history: dict | None = None, sections: dict | None = None
) -> dict:
    """One worker's snapshot: ``history`` from :func:`history_health`, ``sections``
    from :func:`vllm_pp.profiling.snapshot`."""
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


# --------------------------------------------------------------------------- API server


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


class SnapshotCollector:
    """Prometheus collector: ``vllm:probe_pruning_*`` from the workers' snapshots."""

    LABELS = ("model_name", "engine", "rank")

    def __init__(self, directory: str | Callable[[], str | None]) -> None:
        self._directory = directory if callable(directory) else (lambda: directory)

    def describe(self) -> Iterable:
        return []  # no fixed names: not checked for duplicates, not collected at registration

    def collect(self) -> Iterable:
        directory = self._directory()
        snapshots = read_snapshots(directory) if directory else []
        return list(self._families(snapshots))

    def _families(self, snapshots: list[dict]):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not snapshots:
            return
        L = list(self.LABELS)

        def counter(name, doc, extra=()):
            return CounterMetricFamily(PREFIX + name, doc, labels=L + list(extra))

        def gauge(name, doc, extra=()):
            return GaugeMetricFamily(PREFIX + name, doc, labels=L + list(extra))

        steps = counter("steps", "Forward passes run with probe pruning active.")
        tokens = counter("tokens", "Tokens in the forward passes run with probe pruning active.")
        probes = counter("probes", "Block decisions that ran a probe.")
        probe_tokens = counter("probe_tokens", "Tokens run through probes, summed over blocks.")
        runs = counter(
            "block_runs", "Pruned-block executions, by mode (pruned or dense).", ["mode"]
        )
        decide = counter(
            "decide_seconds",
            "Host wall time in the pruning decision (probe, scoring, selection); CPU only.",
        )
        sections = counter(
            "section_seconds",
            "Wall time per section of the pruned path (VLLM_PP_PROFILE=1 only).",
            ["section"],
        )
        skipped = counter(
            "history_skipped_rows",
            "History rows left unchanged because their update was not finite.",
        )
        nonfinite = gauge("history_nonfinite_values", "Non-finite values in the history store.")
        kept_ratio = gauge(
            "kept_ratio",
            "Kept share of a block's heads/channels, mean over the last reporting interval.",
            ["layer", "block"],
        )
        probe_size = gauge("probe_size", "Tokens per probe, mean over the last reporting interval.")
        age = gauge("snapshot_age_seconds", "Age of the worker snapshot these values come from.")
        now = time.time()
        for snapshot in snapshots:
            labels = [str(snapshot["labels"].get(k, "")) for k in self.LABELS]
            blocks = snapshot["blocks"]
            recent = snapshot.get("recent") or {}
            steps.add_metric(labels, snapshot["steps"])
            tokens.add_metric(labels, snapshot["tokens"])
            probes.add_metric(labels, sum(b["probes"] for b in blocks))
            probe_tokens.add_metric(labels, sum(b["probe_tokens"] for b in blocks))
            runs.add_metric(labels + ["pruned"], sum(b["pruned"] for b in blocks))
            runs.add_metric(labels + ["dense"], sum(b["dense"] for b in blocks))
            if any(b["timed"] for b in blocks):
                decide.add_metric(labels, sum(b["decide_seconds"] for b in blocks))
            for section, value in (snapshot.get("sections") or {}).items():
                sections.add_metric(labels + [section], value["seconds"])
            history = snapshot.get("history") or {}
            if history.get("skipped_rows") is not None:
                skipped.add_metric(labels, history["skipped_rows"])
            if history.get("nonfinite_values") is not None:
                nonfinite.add_metric(labels, history["nonfinite_values"])
            for layer, kind, ratio in recent.get("kept_ratio", []):
                kept_ratio.add_metric(labels + [str(layer), kind], ratio)
            if recent.get("probe_size") is not None:
                probe_size.add_metric(labels, recent["probe_size"])
            age.add_metric(labels, max(0.0, now - snapshot["time"]))
        for family in (steps, tokens, probes, probe_tokens, runs, decide, sections, skipped,
                       nonfinite, kept_ratio, probe_size, age):
            if family.samples:
                yield family


_collector: SnapshotCollector | None = None
_owned_directory: str | None = None
_lock = threading.Lock()


def _is_auto_directory(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).startswith(_AUTO_DIR_PREFIX)


def metrics_directory() -> str:
    """This process's snapshot directory, chosen (and put in the environment) on first use.

    A directory the user set in ``PROBE_PRUNING_METRICS_DIR`` is kept. One this module
    chose in another process (inherited, e.g. from a test runner that started
    this server) is replaced, so that two servers never read each other's workers.
    """
    global _owned_directory
    with _lock:
        current = os.environ.get(DIR_ENV)
        if current and (current == _owned_directory or not _is_auto_directory(current)):
            return current
        # Not created here: workers create it with their first snapshot.
        path = os.path.join(
            tempfile.gettempdir(), f"{_AUTO_DIR_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        )
        os.environ[DIR_ENV] = path
        _owned_directory = path
        atexit.register(shutil.rmtree, path, True)
        return path


def prepare_server_metrics(vllm_config) -> None:
    """In the process that builds the engine config: snapshot directory and collector.

    Does nothing when pruning is off. Idempotent.
    """
    global _collector
    from vllm_pp.config import ProbePruningConfig

    if not ProbePruningConfig.from_additional_config(vllm_config.additional_config).enabled:
        return
    metrics_directory()
    with _lock:
        if _collector is not None:
            return
        from prometheus_client import REGISTRY

        _collector = SnapshotCollector(lambda: os.environ.get(DIR_ENV))
        REGISTRY.register(_collector)
