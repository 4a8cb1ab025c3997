"""Saving and loading the live history (--pp-history): shards, checks, method state."""

import pytest
import torch
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.storage.history_shards import load_history_shard, save_history_shard, shard_path

IDENTITY = {"model_type": "llama", "hidden_size": 64}
BLOCKS = [PrunableBlock(3, "attention", width=64, head_dim=32), PrunableBlock(3, "mlp", width=128)]


def _worker(rank=0, tp_size=2, identity=IDENTITY):
    return WorkerInfo(num_layers=4, tp_rank=rank, tp_size=tp_size, model_identity=identity,
                      max_model_len=256)


def _method(rank=0, tp_size=2):
    config = ProbePruningConfig.from_dict({"ratio": 0.4, "history": {"position_bucket_size": 64}})
    return ProbePruningMethod(config, BLOCKS, _worker(rank, tp_size))


def test_history_round_trips_per_rank(tmp_path):
    for rank in (0, 1):
        method = _method(rank)
        for i, rows in enumerate(method.history.values()):
            rows.fill_(rank * 10 + i + 1)
        save_history_shard(tmp_path, method.worker.shard_owner, method.history_tensors(), method.history_layout())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.safetensors", "rank1.safetensors"]
    for rank in (0, 1):
        restored = _method(rank)
        saved = load_history_shard(tmp_path, restored.worker.shard_owner, restored.history_layout())
        restored.load_history(saved)
        assert [rows.unique().tolist() for rows in restored.history.values()] == [
            [rank * 10 + 1.0], [rank * 10 + 2.0]]


def test_first_start_has_no_shard(tmp_path):
    assert load_history_shard(tmp_path / "new", _worker().shard_owner, {"num_buckets": 4}) is None


def test_mismatched_shards_are_refused(tmp_path):
    method = _method(0, tp_size=1)
    save_history_shard(tmp_path, method.worker.shard_owner, method.history_tensors(), method.history_layout())
    layout = method.history_layout()
    with pytest.raises(ProbePruningConfigError, match="tensor_parallel_size=1, this server runs 2"):
        load_history_shard(tmp_path, _worker(0, tp_size=2).shard_owner, layout)
    with pytest.raises(ProbePruningConfigError, match="another model: hidden_size=64"):
        load_history_shard(tmp_path, _worker(0, 1, {**IDENTITY, "hidden_size": 32}).shard_owner, layout)
    with pytest.raises(ProbePruningConfigError, match="has layout .* this server uses") as err:
        load_history_shard(tmp_path, _worker(0, 1).shard_owner, {**layout, "position_bucket_size": 1})
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


def test_shard_path_names_the_rank(tmp_path):
    assert shard_path(tmp_path, 3) == tmp_path / "rank3.safetensors"


def test_engine_loads_a_saved_history_and_saves_it_at_shutdown(random_models, tmp_path, monkeypatch):
    from helpers.engines import vllm_engine
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm_pp.runtime import pruning
    from vllm_pp.storage.statistics import model_identity

    model = random_models["llama-gqa"]
    worker = WorkerInfo(num_layers=6, tp_rank=0, tp_size=1, max_model_len=512,
                        model_identity=model_identity(AutoConfig.from_pretrained(model)))
    widths = {"attention": 256, "mlp": 512}
    saved = {f"layers.{layer}.{kind}.rank0.history": torch.full((8, width), 2.0)
             for layer in (3, 4, 5) for kind, width in widths.items()}
    layout = {"position_bucket_size": 64, "num_buckets": 8}
    save_history_shard(tmp_path, worker.shard_owner, saved, layout)
    config = {"probe_pruning": {"ratio": 0.4, "history": {"path": str(tmp_path)}}}
    # The worker runs in this process: record what it logs, whatever logging
    # configuration earlier tests (or Ray) left behind.
    messages = []
    monkeypatch.setattr(pruning.logger, "info", lambda message, *args: messages.append(message % args))
    with vllm_engine(model, in_process=True, additional_config=config) as llm:
        (loaded,) = llm.apply_model(lambda m: m.probe_pruning.method.history_tensors())
        assert all(torch.equal(loaded[name], saved[name]) for name in saved)
        llm.generate([{"prompt_token_ids": list(range(1, 40))}], SamplingParams(max_tokens=4))
    # The store's memory is reported at start-up: 6 blocks x 8 rows x (256 or 512) x 4 bytes.
    assert ("Probe pruning history (rank 0): 6 blocks, 0.1 MiB, layout "
            "{'position_bucket_size': 64, 'num_buckets': 8}") in messages
    after = load_history_shard(tmp_path, worker.shard_owner, layout)
    assert sorted(after) == sorted(name.replace(".rank0.", ".") for name in saved)
    # Served steps moved the history (bucket 0 holds every position here).
    assert all(not torch.equal(after[name], torch.full_like(after[name], 2.0)) for name in after)
