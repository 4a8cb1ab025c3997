"""Tensor parallelism through vLLM's Ray executor on CPU (vllm_pp/ray_on_cpu.py).

One Ray head on loopback serves every test here (RAY_ADDRESS); engines run
their engine core in this process so that each step holds the same requests
under both executors.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.engines import vllm_engine
from vllm_pp.tools.engine import free_port
from vllm_pp.tools.calibrate import calibrate
from vllm_pp.tools.engine import environ

RAY = str(Path(sys.executable).parent / "ray")
PROMPTS = [[1, 5, 9, 200, 31, 7, 1000, 44] * k for k in (1, 3, 6)] + [[2, 3]]
MAX_TOKENS = 12


def _ray_processes(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def ray_head():
    port = free_port()
    # A private loopback cluster: Ray's token authentication is not needed.
    with environ(RAY_AUTH_MODE="disabled"):
        subprocess.run(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
            check=True, capture_output=True,
        )
    try:
        with environ(RAY_ADDRESS=f"127.0.0.1:{port}", RAY_AUTH_MODE="disabled"):
            yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()  # this process's connection, made by the in-process engine cores
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    deadline = time.monotonic() + 30
    while (left := _ray_processes("raylet|gcs_server|ray::")) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def calibrations(random_models, ray_head, tmp_path_factory):
    """One TP=2 calibration file per family, written through Ray."""
    from vllm_pp.tools.text_data import prepare_text

    text = prepare_text(quiet=True).calibration
    out = tmp_path_factory.mktemp("calibration")
    files = {}
    for family in ("llama-gqa", "opt"):
        files[family] = out / f"{family}-tp2.safetensors"
        calibrate(str(random_models[family]), files[family], text=text, num_samples=8, seq_len=64,
                  batch_size=4, dtype="float32", tensor_parallel_size=2,
                  distributed_executor_backend="ray")
    return files


def _greedy_and_history(model: Path, backend: str, probe_pruning: dict):
    """Greedy tokens of PROMPTS, and each rank's history after serving them."""
    from vllm import SamplingParams

    with vllm_engine(model, in_process=True, tensor_parallel_size=2,
                     distributed_executor_backend=backend,
                     additional_config={"probe_pruning": probe_pruning}) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        histories = llm.apply_model(_history_tensors)
        kept_shares = llm.apply_model(_kept_share)
    return [list(o.outputs[0].token_ids) for o in outputs], histories, kept_shares


# Module level: TP workers receive these pickled by reference (tests/ is on their path).
def _history_tensors(model):
    return model.probe_pruning.method.history_tensors()


def _kept_share(model):
    """Share of its units a rank's pruned blocks kept, over the steps they ran."""
    blocks = model.probe_pruning.stats.blocks
    return sum(b.kept for b in blocks) / sum(b.pruned * b.units for b in blocks)


# Pruned runs only: ratio 0 runs vLLM's own model code through the same
# executor (tests/test_passthrough.py covers ratio 0), and every TP=2 engine
# start costs ~60 s of the suite's budget.
@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_ray_and_mp_give_identical_greedy_outputs(family, random_models, calibrations):
    config = {"ratio": 0.4, "calibration": str(calibrations[family])}
    tokens, history_ray, kept_ray = _greedy_and_history(random_models[family], "ray", config)
    mp_tokens, history_mp, kept_mp = _greedy_and_history(random_models[family], "mp", config)
    assert tokens == mp_tokens
    # Pruning really ran on both ranks, and made the same choices on both executors.
    assert kept_ray == kept_mp and all(0 < share < 1 for share in kept_ray), kept_ray
    # Each rank kept its own shard (loaded from the TP=2 file, then updated by
    # the same steps): equal across executors, different across ranks.
    assert [sorted(h) for h in history_ray] == [sorted(h) for h in history_mp]
    for ray_shard, mp_shard in zip(history_ray, history_mp):
        assert all(torch.equal(ray_shard[name], mp_shard[name]) for name in ray_shard)
    rank0, rank1 = (list(h.values()) for h in history_ray)
    assert rank0 and not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


def test_ray_tp2_server_survives_kill_9_serves_saves_history_and_leaves_no_actors(
    random_models, calibrations, tmp_path
):
    """Kill drill through the Ray executor at TP=2 (vllm_pp/tools/kill_drill.py): after
    each kill -9 (engine core and Ray actors) both ranks load the same, newest common
    round; a round that only rank 0 finished is not loaded by either. The last start
    answers, saves both shards at clean shutdown and leaves no actor behind."""
    from openai import OpenAI
    from safetensors import safe_open
    from vllm_pp.storage.history_shards import common_round, saved_rounds, shard_path
    from vllm_pp.storage.statistics import read_metadata
    from vllm_pp.tools.engine import stop_server
    from vllm_pp.tools.kill_drill import Drill

    history = tmp_path / "history"
    drill = Drill(
        serve_args=[str(random_models["llama-gqa"]), "--tensor-parallel-size", "2",
                    "--distributed-executor-backend", "ray", "--pp-ratio", "0.4",
                    "--pp-calibration", str(calibrations["llama-gqa"]),
                    "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8"],
        history=history, work_dir=tmp_path / "drill", tp_size=2, kills=2, checkpoint_seconds=2.0,
        serve_seconds=(8.0, 12.0), also_kill=("ray::CpuRayWorkerProc",), seed=2,
        # Ray folds log lines that differ only in numbers (the ranks' start-up lines) unless told not to.
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "RAY_DEDUP_LOGS": "0"}, cut_short_after_kill=2,
    )
    report = drill.run(keep_last_running=True)
    process, url = report.pop("server")
    try:
        first, second = report["kills"]
        # Both ranks loaded the same round, the newest both held (the drill checks it
        # against the files: a kill may land while one rank still writes).
        assert first["loaded"][0] == first["loaded"][1]
        assert first["loaded"][0][0] == common_round([first["held_after_kill"][r] for r in (0, 1)])
        # Rank 1's newest round deleted (as if cut short): every rank loads the one before.
        assert "cut_short" in second, f"too few rounds to cut one short: {second['held_after_kill']}"
        cut = second["cut_short"]["round"]
        loaded = second["loaded"][0][0]
        assert loaded == second["loaded"][1][0] and loaded is not None and loaded < cut
        log = (tmp_path / "drill" / "start2.log").read_text()
        assert f"every rank loads round {loaded}, the newest all of them hold" in log
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        completion = client.completions.create(model=model, prompt="Hello there", max_tokens=8)
        assert completion.choices[0].text and completion.usage.completion_tokens == 8
        stream = client.completions.create(model=model, prompt="Once", max_tokens=4, stream=True)
        assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) >= 1
        assert _ray_processes("ray::CpuRayWorkerProc")
    finally:
        stop_server(process)

    deadline = time.monotonic() + 30
    while (actors := _ray_processes("ray::CpuRayWorkerProc")) and time.monotonic() < deadline:
        time.sleep(1)
    assert not actors, f"Ray actors left after the server exited: {actors}"
    last = saved_rounds(history, 0)[-1]
    for rank in (0, 1):  # saved by each Ray worker at shutdown, as the same round
        assert saved_rounds(history, rank)[-1] == last
        shard = shard_path(history, rank, last)
        metadata = read_metadata(shard)
        assert metadata["kind"] == "history" and metadata["tensor_parallel_rank"] == rank
        assert metadata["tensor_parallel_size"] == 2
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            tensors = [f.get_tensor(name) for name in names]
        assert names and all(f".rank{rank}." in name for name in names)
        assert tensors and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in tensors)


def test_ray_worker_refuses_history_of_another_tp_size(random_models, ray_head, tmp_path):
    from transformers import AutoConfig
    from vllm_pp.storage.history_shards import save_history_shard
    from vllm_pp.storage.statistics import ShardOwner, model_identity

    model = random_models["llama-gqa"]
    tp1 = ShardOwner(model_identity(AutoConfig.from_pretrained(model)), tp_size=1, rank=0)
    save_history_shard(tmp_path, tp1, {"layers.3.mlp.rank0.history": torch.ones(8, 512)},
                       {"position_bucket_size": 64, "num_buckets": 8}, round_index=1, steps=0)
    with pytest.raises(Exception) as failure:
        with vllm_engine(model, in_process=True, tensor_parallel_size=2,
                         distributed_executor_backend="ray",
                         additional_config={"probe_pruning": {
                             "ratio": 0.4, "history": {"path": str(tmp_path)}}}):
            pass
    # The worker's one-line error travels inside Ray's and vLLM's start-up errors.
    assert "was written with tensor_parallel_size=1, this server runs 2" in _all_messages(failure.value)
    # The refused start-up took its worker actors down with it.
    deadline = time.monotonic() + 30
    while (left := _ray_processes("ray::CpuRayWorkerProc")) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"worker actors outlived the refused start-up: {left}"


def _all_messages(error: BaseException) -> str:
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)
