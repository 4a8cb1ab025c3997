"""The API server's side of the probe-pruning metrics: ``vllm:probe_pruning_*`` on ``/metrics``.

:class:`SnapshotCollector` is a Prometheus collector in the default registry,
which vLLM's ``/metrics`` serves, that turns the workers' snapshots
(:mod:`vllm_pp.observability.snapshots`) into ``vllm:probe_pruning_*`` series.
:func:`prepare_server_metrics` sets it up in the process that builds the engine
config (``vllm serve``'s API server, or an offline ``LLM``) when pruning is on;
it also picks the snapshot directory and puts it in the environment, which the
engine core, its workers and (through vLLM's driver environment) Ray actors
inherit. vLLM's stat-logger plugins only see engine-core stats, never the
workers', hence the files.

Limits: snapshots travel through a local directory, so workers on other nodes
are not seen; with ``--api-server-count`` > 1 vLLM serves a multiprocess
registry that this collector is not part of.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Iterable

from vllm_pp.observability.snapshots import DIR_ENV, read_snapshots

PREFIX = "vllm:probe_pruning_"
# Directories this module creates on its own start with this.
_AUTO_DIR_PREFIX = "vllm-pp-metrics-"


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
        checkpoints = counter(
            "history_checkpoints",
            "History checkpoint rounds of --pp-history, by outcome (written, failed, skipped).",
            ["outcome"],
        )
        checkpoint_age = gauge(
            "history_checkpoint_age_seconds", "Age of the newest history round this worker wrote."
        )
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
            written = snapshot.get("checkpoints")
            if written is not None:
                for outcome in ("written", "failed", "skipped"):
                    checkpoints.add_metric(labels + [outcome], written[outcome])
                if written["last_written_at"] is not None:
                    checkpoint_age.add_metric(labels, max(0.0, now - written["last_written_at"]))
            age.add_metric(labels, max(0.0, now - snapshot["time"]))
        for family in (steps, tokens, probes, probe_tokens, runs, decide, sections, skipped,
                       nonfinite, checkpoints, checkpoint_age, kept_ratio, probe_size, age):
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


def prepare_server_metrics() -> None:
    """In the process that builds an engine config with pruning on: snapshot directory
    and collector. Idempotent."""
    global _collector
    metrics_directory()
    with _lock:
        if _collector is not None:
            return
        from prometheus_client import REGISTRY

        _collector = SnapshotCollector(lambda: os.environ.get(DIR_ENV))
        REGISTRY.register(_collector)
