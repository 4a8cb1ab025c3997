"""Probe-pruning metrics: recording, snapshots, the /metrics collector, the log line.

No engine here; the end-to-end check of a server's /metrics is in
tests/test_load.py (test_pruned_server_under_load).
"""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.methods.dense import Dense
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.observability import server, snapshots, worker
from vllm_pp.observability.server import SnapshotCollector
from vllm_pp.observability.snapshots import write_snapshot
from vllm_pp.observability.worker import PruningStats, Reporter, build_snapshot, recent_means, summary_line
from vllm_pp.runtime.history_checkpoints import CheckpointStatus
from vllm_pp.runtime.pruning import BlockPruner

ATTENTION = PrunableBlock(layer_index=0, kind="attention", width=32, head_dim=8)  # 4 heads
MLP = PrunableBlock(layer_index=1, kind="mlp", width=16)


class FakeMethod:
    """Probes 3 rows and keeps the first units; dense at odd steps for the MLP."""

    def decide(self, block, batch, residual, probe):
        if block is MLP and batch.index % 2:
            return None
        probe(torch.arange(3))
        return torch.arange(block.num_units // 2)

    def output_correction(self, block, kept):
        return None

    def update(self, block, batch, channels, activations):
        pass


class FakeBlock:
    """A block adapter that only says which path ran."""

    def probe(self, inputs, rows):
        return rows

    def every_row_computed(self, inputs):
        return False

    def dense(self, inputs):
        return "dense"

    def pruned(self, inputs, kept, correction):
        return "pruned", None, None


def _pruning():
    stats = PruningStats(labels={"model_name": "m", "engine": "0", "rank": "0"}, method="probe")
    pruning = SimpleNamespace(stats=stats, steps=SimpleNamespace(batch=None), method=FakeMethod())
    return pruning, [BlockPruner(b, FakeBlock(), pruning) for b in (ATTENTION, MLP)]


def _run_steps(pruning, pruners, num_steps, num_tokens=5):
    residual = torch.zeros(num_tokens, 4)
    for index in range(num_steps):
        pruning.steps.batch = SimpleNamespace(index=index, num_tokens=num_tokens)
        pruning.stats.begin_step(num_tokens)
        for pruner in pruners:
            assert pruner.run(residual, None) in ("pruned", "dense")


def _probe_pruning_method(nonfinite: int = 0, skipped: int = 0) -> ProbePruningMethod:
    """A real PP method (its history health is what the reporter reads)."""
    config = ProbePruningConfig(ratio=0.4, skip_layers=[])
    method = ProbePruningMethod(config, [ATTENTION, MLP], WorkerInfo(num_layers=2, tp_rank=0, tp_size=1, max_model_len=128))
    method.history[MLP].view(-1)[:nonfinite] = float("nan")
    method._skipped_rows += skipped
    return method


def test_block_pruner_records_host_side_counts():
    pruning, (attention, mlp) = _pruning()
    # Warm-up (no batch): dense and not counted.
    assert attention.run(torch.zeros(1, 4), None) == "dense"
    _run_steps(pruning, (attention, mlp), num_steps=4)
    a, m = attention.stats, mlp.stats
    assert (a.pruned, a.dense, a.kept, a.probes, a.probe_tokens) == (4, 0, 8, 4, 12)
    assert (m.pruned, m.dense, m.kept, m.probes, m.probe_tokens) == (2, 2, 16, 2, 6)
    assert a.timed == 4 and a.decide_seconds > 0  # CPU tensors: wall time measured
    assert (pruning.stats.steps, pruning.stats.tokens) == (4, 20)


def test_snapshot_window_and_log_line():
    pruning, pruners = _pruning()
    health = _probe_pruning_method(nonfinite=1, skipped=7).history_health()
    _run_steps(pruning, pruners, num_steps=2)
    first = build_snapshot(pruning.stats, health)
    assert first["history"] == {"nonfinite_values": 1, "skipped_rows": 7}
    _run_steps(pruning, pruners, num_steps=2)
    second = build_snapshot(pruning.stats, health)
    recent = recent_means(second, first, None)
    assert recent == {"kept_ratio": [[0, "attention", 0.5], [1, "mlp", 0.5]], "probe_size": 3.0}
    # An idle interval keeps the last means.
    assert recent_means(second, second, recent) is recent
    line = summary_line(second, first, 60)
    assert "2 steps, 10 tokens in 60 s" in line and "attention kept 50.0%" in line
    assert "history non-finite 1, skipped rows 7" in line
    # A method without a history reports none.
    dense = Dense(ProbePruningConfig(ratio=0.4, method="dense"), [MLP], WorkerInfo(2, 0, 1))
    assert dense.history_health() == {"nonfinite_values": None, "skipped_rows": None}


def _sample(text: str, name: str, **labels: str) -> float:
    """The one sample of ``vllm:probe_pruning_<name>`` with these labels (and rank 0)."""
    labels = {"model_name": "m", "engine": "0", "rank": "0", **labels}
    (value,) = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == server.PREFIX + name and s.labels == labels
    ]
    return value


def test_collector_serves_snapshots_of_live_workers(tmp_path):
    pruning, pruners = _pruning()
    _run_steps(pruning, pruners, num_steps=4)
    checkpoints = CheckpointStatus(loaded_round=3, written=5, failed=2, skipped=1, last_round=8,
                                   last_written_at=time.time() - 30)
    snapshot = build_snapshot(pruning.stats, _probe_pruning_method().history_health(),
                              checkpoints=checkpoints.as_dict())
    write_snapshot(str(tmp_path), {**snapshot, "recent": recent_means(snapshot, None, None)})
    # A dead worker's file and a partial temp file are ignored.
    dead = {**snapshot, "pid": 2**22 + 12345, "labels": {**snapshot["labels"], "rank": "9"}}
    write_snapshot(str(tmp_path), dead)
    (tmp_path / ".tmp-x.json").write_text("{")
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(str(tmp_path)))
    text = generate_latest(registry).decode()
    assert _sample(text, "steps_total") == 4
    assert _sample(text, "probe_tokens_total") == 18
    assert _sample(text, "kept_ratio", layer="1", block="mlp") == 0.5
    assert _sample(text, "probe_size") == 3
    assert _sample(text, "block_runs_total", mode="dense") == 2
    assert _sample(text, "history_skipped_rows_total") == 0
    assert _sample(text, "decide_seconds_total") > 0
    assert _sample(text, "history_checkpoints_total", outcome="written") == 5
    assert _sample(text, "history_checkpoints_total", outcome="failed") == 2
    assert _sample(text, "history_checkpoints_total", outcome="skipped") == 1
    assert 30 <= _sample(text, "history_checkpoint_age_seconds") < 90
    assert 'rank="9"' not in text
    # No snapshots (pruning off, or before the first step): nothing at all.
    empty = CollectorRegistry()
    empty.register(SnapshotCollector(str(tmp_path / "missing")))
    assert "probe_pruning" not in generate_latest(empty).decode()


def test_reporter_writes_snapshots_and_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(snapshots.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(worker.INTERVAL_ENV, "0.1")
    monkeypatch.setenv(worker.LOG_INTERVAL_ENV, "0.2")
    pruning, pruners = _pruning()

    class Holder:  # the reporter holds its ProbePruning weakly
        def metrics_snapshot(self):
            return build_snapshot(pruning.stats, {})

    holder = Holder()
    logger = logging.getLogger("test_metrics_reporter")
    reporter = Reporter(holder, logger)
    with caplog.at_level(logging.INFO, logger=logger.name):
        reporter.start()
        _run_steps(pruning, pruners, num_steps=3)
        deadline = time.monotonic() + 10
        while not (list(tmp_path.glob("*.json")) and caplog.records):
            assert time.monotonic() < deadline, "no snapshot or log line"
            time.sleep(0.05)
        reporter.stop()
    (path,) = tmp_path.glob("*.json")
    assert path.name == f"engine0-rank0-pid{os.getpid()}.json"
    assert "Probe pruning (rank 0, engine 0): 3 steps" in caplog.records[0].getMessage()


def test_metrics_directory_is_per_server(monkeypatch):
    # Inherited from another process that chose it (a test runner): replaced.
    monkeypatch.setenv(snapshots.DIR_ENV, "/tmp/vllm-pp-metrics-1-abcd")
    monkeypatch.setattr(server, "_owned_directory", None)
    chosen = server.metrics_directory()
    assert chosen != "/tmp/vllm-pp-metrics-1-abcd" and os.environ[snapshots.DIR_ENV] == chosen
    assert server.metrics_directory() == chosen  # stable within this process
    # Set by the user: kept.
    monkeypatch.setenv(snapshots.DIR_ENV, "/srv/pp-metrics")
    assert server.metrics_directory() == "/srv/pp-metrics"


@pytest.mark.parametrize("value, expected", [("2.5", 2.5), ("x", 5.0), ("-1", 5.0)])
def test_interval_from_env(monkeypatch, value, expected):
    monkeypatch.setenv(worker.INTERVAL_ENV, value)
    assert worker._seconds_from_env(worker.INTERVAL_ENV, 5.0) == expected
