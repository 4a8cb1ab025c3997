"""Saving and loading the live history (--pp-history): shards, rounds, checks, method state."""

import time

import pytest
import torch
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.storage.history_shards import (
    common_round,
    load_history_shard,
    save_history_shard,
    saved_rounds,
    shard_path,
)

IDENTITY = {"model_type": "llama", "hidden_size": 64}
BLOCKS = [PrunableBlock(3, "attention", width=64, head_dim=32), PrunableBlock(3, "mlp", width=128)]


def _worker(rank=0, tp_size=2, identity=IDENTITY):
    return WorkerInfo(num_layers=4, tp_rank=rank, tp_size=tp_size, model_identity=identity,
                      max_model_len=256)


def _method(rank=0, tp_size=2):
    config = ProbePruningConfig.from_dict({"ratio": 0.4, "history": {"position_bucket_size": 64}})
    return ProbePruningMethod(config, BLOCKS, _worker(rank, tp_size))


def _save(directory, method, round_index, steps=0):
    return save_history_shard(directory, method.worker.shard_owner, method.history_tensors(),
                              method.history_layout(), round_index=round_index, steps=steps)


def test_history_round_trips_per_rank(tmp_path):
    for rank in (0, 1):
        method = _method(rank)
        for i, rows in enumerate(method.history.values()):
            rows.fill_(rank * 10 + i + 1)
        _save(tmp_path, method, 7, steps=123)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank0.round000007.safetensors", "rank1.round000007.safetensors"]
    for rank in (0, 1):
        restored = _method(rank)
        saved, metadata = load_history_shard(tmp_path, restored.worker.shard_owner,
                                             restored.history_layout(), 7)
        restored.load_history(saved)
        assert [rows.unique().tolist() for rows in restored.history.values()] == [
            [rank * 10 + 1.0], [rank * 10 + 2.0]]
        assert metadata["round"] == 7 and metadata["steps"] == 123
        assert abs(metadata["saved_at"] - time.time()) < 60


def test_a_rank_keeps_its_two_newest_rounds(tmp_path):
    method, other = _method(0), _method(1)
    _save(tmp_path, other, 1)
    for round_index in (1, 2, 3, 4):
        _save(tmp_path, method, round_index)
    assert saved_rounds(tmp_path, 0) == [3, 4]
    assert saved_rounds(tmp_path, 1) == [1]  # another rank's files are its own business
    # A temporary file left by a write cut short is neither a round nor kept.
    (tmp_path / ".rank0.round000005.safetensors.abc.tmp").write_bytes(b"partial")
    assert saved_rounds(tmp_path, 0) == [3, 4]
    _save(tmp_path, method, 5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".rank0", "rank0"))) == [
        "rank0.round000004.safetensors", "rank0.round000005.safetensors"]
    assert saved_rounds(tmp_path / "missing", 0) == []


@pytest.mark.parametrize("held, expected", [
    ([[], []], None),  # a first start
    ([[4, 5], [4, 5]], 5),
    ([[4, 5], [4]], 4),  # rank 1 died while writing round 5
    ([[5, 6], [3, 4]], None),  # nothing in common: every rank starts from calibration
    ([[2, 3]], 3),
    ([], None),
])
def test_every_rank_loads_the_newest_round_all_of_them_hold(held, expected):
    assert common_round(held) == expected


def test_mismatched_shards_are_refused(tmp_path):
    method = _method(0, tp_size=1)
    _save(tmp_path, method, 1)
    layout = method.history_layout()
    with pytest.raises(ProbePruningConfigError, match="tensor_parallel_size=1, this server runs 2"):
        load_history_shard(tmp_path, _worker(0, tp_size=2).shard_owner, layout, 1)
    with pytest.raises(ProbePruningConfigError, match="another model: hidden_size=64"):
        load_history_shard(tmp_path, _worker(0, 1, {**IDENTITY, "hidden_size": 32}).shard_owner, layout, 1)
    with pytest.raises(ProbePruningConfigError, match="has layout .* this server uses") as err:
        load_history_shard(tmp_path, _worker(0, 1).shard_owner, {**layout, "position_bucket_size": 1}, 1)
    assert "\n" not in str(err.value)


def test_a_bad_saved_history_leaves_the_live_one_untouched():
    method = _method()
    before = [rows.clone() for rows in method.history.values()]
    good = {name.replace(".rank0.", "."): rows + 1 for name, rows in method.history_tensors().items()}
    for bad_value in (torch.zeros(3, 3), torch.full((4, 64), float("nan"))):
        bad = {**good, "layers.3.attention.history": bad_value}
        with pytest.raises(ProbePruningConfigError, match="saved history layers.3.attention.history"):
            method.load_history(bad)
        assert all(torch.equal(a, b) for a, b in zip(before, method.history.values()))


def test_shard_path_names_the_rank_and_round(tmp_path):
    assert shard_path(tmp_path, 3, 12) == tmp_path / "rank3.round000012.safetensors"


def test_engine_loads_the_newest_round_checkpoints_while_serving_and_at_shutdown(
    random_models, tmp_path, monkeypatch
):
    from helpers.engines import vllm_engine
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm_pp.runtime import pruning
    from vllm_pp.storage.statistics import model_identity

    model = random_models["llama-gqa"]
    worker = WorkerInfo(num_layers=6, tp_rank=0, tp_size=1, max_model_len=512,
                        model_identity=model_identity(AutoConfig.from_pretrained(model)))
    widths = {"attention": 256, "mlp": 512}
    layout = {"position_bucket_size": 64, "num_buckets": 8}

    def history(value):
        return {f"layers.{layer}.{kind}.rank0.history": torch.full((8, width), value)
                for layer in (3, 4, 5) for kind, width in widths.items()}

    save_history_shard(tmp_path, worker.shard_owner, history(1.0), layout, round_index=3, steps=5)
    saved = history(2.0)
    save_history_shard(tmp_path, worker.shard_owner, saved, layout, round_index=4, steps=10)
    # A round is due at the first step boundary after 10 ms: one per step here.
    config = {"probe_pruning": {"ratio": 0.4, "history": {"path": str(tmp_path), "checkpoint_seconds": 0.01}}}
    # The worker runs in this process: record what it logs, whatever logging
    # configuration earlier tests (or Ray) left behind.
    messages = []
    monkeypatch.setattr(pruning.logger, "info", lambda message, *args: messages.append(message % args))
    with vllm_engine(model, in_process=True, additional_config=config) as llm:
        (loaded,) = llm.apply_model(lambda m: m.probe_pruning.method.history_tensors())
        assert all(torch.equal(loaded[name], saved[name]) for name in saved)
        llm.generate([{"prompt_token_ids": list(range(1, 40))}], SamplingParams(max_tokens=4))
        (served_steps,) = llm.apply_model(lambda m: m.probe_pruning.stats.steps)
        time.sleep(0.5)  # the background write of the last periodic round
        rounds_while_serving = saved_rounds(tmp_path, 0)
    # The store's memory is reported at start-up: 6 blocks x 8 rows x (256 or 512) x 4 bytes.
    assert ("Probe pruning history (rank 0): 6 blocks, 0.1 MiB, layout "
            "{'position_bucket_size': 64, 'num_buckets': 8}") in messages
    (loaded_line,) = [m for m in messages if "loaded round" in m]
    assert f"loaded round 4 from {tmp_path}/rank0.round000004.safetensors" in loaded_line
    assert loaded_line.endswith("after 10 served steps")
    # 1 prefill + 3 decode steps, each followed by a periodic round (5, 6, ...),
    # then the last round at shutdown, each counting the steps learned so far.
    assert served_steps == 4
    assert rounds_while_serving[-1] >= 5
    last = saved_rounds(tmp_path, 0)[-1]
    assert last == rounds_while_serving[-1] + 1
    after, metadata = load_history_shard(tmp_path, worker.shard_owner, layout, last)
    assert metadata["steps"] == 10 + served_steps
    assert sorted(after) == sorted(name.replace(".rank0.", ".") for name in saved)
    # Served steps moved the history (bucket 0 holds every position here).
    assert all(not torch.equal(after[name], torch.full_like(after[name], 2.0)) for name in after)
