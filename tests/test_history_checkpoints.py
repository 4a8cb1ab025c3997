"""History checkpoints while serving: the engine core's schedule, a rank's background
writer (failures counted, never raised), and the frozen history."""

import threading

import pytest
import torch
from vllm_pp.config import ProbePruningConfig
from vllm_pp.methods.base import Probe, PrunableBlock, StepBatch, WorkerInfo
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.runtime import history_checkpoints
from vllm_pp.runtime.history_checkpoints import CheckpointSchedule, HistoryWriter
from vllm_pp.storage.history_shards import load_history_shard, saved_rounds
from vllm_pp.storage.statistics import ShardOwner

OWNER = ShardOwner(identity={"model_type": "llama"}, tp_size=1, rank=0)
LAYOUT = {"position_bucket_size": 64, "num_buckets": 2}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_round_is_due_after_the_interval_at_a_step_that_ran_the_model():
    clock = FakeClock()
    schedule = CheckpointSchedule(60.0, next_round=5, clock=clock)
    assert schedule.after_step(True) is None  # not yet
    clock.now += 61
    assert schedule.after_step(False) == 5  # the model ran since the last round
    schedule = CheckpointSchedule(60.0, next_round=5, clock=clock)
    clock.now += 61
    assert schedule.after_step(False) is None  # nothing served since the last round
    assert schedule.after_step(True) == 5
    assert schedule.after_step(True) is None  # the interval starts again
    clock.now += 60
    assert schedule.after_step(True) == 6
    assert schedule.start_round() == 7  # the last round, at shutdown
    never = CheckpointSchedule(0.0, next_round=1, clock=clock)
    clock.now += 1e6
    assert never.after_step(True) is None and never.start_round() == 1


def test_the_writer_saves_a_copy_taken_at_the_step_boundary(tmp_path):
    history = {"layers.3.mlp.rank0.history": torch.ones(2, 8)}
    writer = HistoryWriter(tmp_path, OWNER, LAYOUT)
    release = threading.Event()
    original = history_checkpoints.save_history_shard

    def slow_save(*args, **kwargs):
        release.wait(10)
        return original(*args, **kwargs)

    writer_module_save = pytest.MonkeyPatch()
    writer_module_save.setattr(history_checkpoints, "save_history_shard", slow_save)
    try:
        writer.write(history, 1, steps=7, wait=False)
        history["layers.3.mlp.rank0.history"].fill_(5.0)  # the next step updates the history
        assert writer.busy
        writer.write(history, 2, steps=8, wait=False)  # the disk is slow: skipped, not waited for
        assert writer.status.skipped == 1
        release.set()
        writer.write(history, 3, steps=9, wait=True)  # the last round waits for both
    finally:
        writer_module_save.undo()
    assert saved_rounds(tmp_path, 0) == [1, 3]
    first, metadata = load_history_shard(tmp_path, OWNER, LAYOUT, 1)
    assert torch.equal(first["layers.3.mlp.history"], torch.ones(2, 8)) and metadata["steps"] == 7
    last, metadata = load_history_shard(tmp_path, OWNER, LAYOUT, 3)
    assert torch.equal(last["layers.3.mlp.history"], torch.full((2, 8), 5.0)) and metadata["steps"] == 9
    assert (writer.status.written, writer.status.failed, writer.status.last_round) == (2, 0, 3)


def test_a_failed_write_is_logged_counted_and_the_next_round_tries_again(tmp_path, caplog):
    history = {"layers.3.mlp.rank0.history": torch.ones(2, 8)}
    volume = tmp_path / "volume"
    directory = volume / "history"
    writer = HistoryWriter(directory, OWNER, LAYOUT)
    volume.write_text("not a directory")  # the directory's volume vanished under a file
    writer.write(history, 1, steps=1, wait=True)
    assert (writer.status.written, writer.status.failed) == (0, 1)
    (warning,) = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert warning == (
        f"Probe pruning history (rank 0): round 1 could not be written to {directory}: "
        "Not a directory; serving goes on, the next round tries again")
    volume.unlink()
    writer.write(history, 2, steps=2, wait=True)
    assert (writer.status.written, writer.status.failed, writer.status.last_round) == (1, 1, 2)


def _method(update: bool) -> ProbePruningMethod:
    config = ProbePruningConfig.from_dict(
        {"ratio": 0.4, "skip_layers": [], "history": {"update": update}})
    worker = WorkerInfo(num_layers=1, tp_rank=0, tp_size=1, max_model_len=64)
    return ProbePruningMethod(config, [PrunableBlock(0, "mlp", width=128)], worker)


@pytest.mark.parametrize("update", [True, False])
def test_a_frozen_history_is_used_but_never_updated(update):
    method = _method(update)
    (block,) = method.blocks
    method.prepare({block: torch.ones(16, 128)})
    method.history[block].fill_(1.0)
    batch = StepBatch(index=0, num_tokens=4, max_query_len=4, positions=torch.arange(4),
                      query_start_loc=torch.tensor([0, 4]), seq_lens=torch.tensor([4]))
    residual = torch.randn(4, 16)
    kept = method.decide(block, batch, residual, Probe(lambda rows: torch.randn(len(rows), 128)))
    method.update(block, batch, kept, torch.full((4, kept.numel()), 3.0))
    method.end_step(batch)
    assert torch.equal(method.history[block], torch.ones(1, 128)) == (not update)


def test_a_frozen_history_repeats_greedy_outputs_after_other_traffic(random_models):
    """With history.update false the same batch gets the same greedy tokens, whatever
    ran in between (the learning default may answer differently: it learned)."""
    import random

    from helpers.engines import vllm_engine
    from vllm import SamplingParams

    rng = random.Random(0)
    batch = [{"prompt_token_ids": [rng.randrange(1, 1000) for _ in range(n)]} for n in (5, 40, 90, 17)]
    traffic = [{"prompt_token_ids": [rng.randrange(1, 1000) for _ in range(rng.randrange(4, 200))]}
               for _ in range(48)]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    config = {"probe_pruning": {"ratio": 0.4, "history": {"update": False}}}
    with vllm_engine(random_models["llama-gqa"], in_process=True, additional_config=config) as llm:
        first = [o.outputs[0].token_ids for o in llm.generate(batch, greedy)]
        llm.generate(traffic, SamplingParams(max_tokens=24, temperature=0))
        again = [o.outputs[0].token_ids for o in llm.generate(batch, greedy)]
        (steps,) = llm.apply_model(lambda m: m.probe_pruning.stats.steps)
    assert steps > 24  # pruning ran at every step of the three batches
    assert again == first


def test_a_round_is_copied_without_waiting_for_the_device(device, tmp_path):
    """On CUDA the copy runs on a side stream (sync debug mode would raise on a wait);
    the saved round holds the history as it was at the step boundary, not after the
    update queued right behind it."""
    history = {"layers.3.mlp.rank0.history": torch.full((2, 8), 1.0, device=device)}
    writer = HistoryWriter(tmp_path, OWNER, LAYOUT)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        writer.write(history, 1, steps=1, wait=False)
        history["layers.3.mlp.rank0.history"].add_(1.0)  # the next step's update
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    writer.write(history, 2, steps=2, wait=True)
    first, _ = load_history_shard(tmp_path, OWNER, LAYOUT, 1)
    second, _ = load_history_shard(tmp_path, OWNER, LAYOUT, 2)
    assert torch.equal(first["layers.3.mlp.history"], torch.full((2, 8), 1.0))
    assert torch.equal(second["layers.3.mlp.history"], torch.full((2, 8), 2.0))
