"""`vllm-pp calibrate` and `vllm-pp eval ppl` on a tiny model, and the statistics file checks."""

import math

import pytest
import torch
from safetensors import safe_open
from vllm_pp.config import ProbePruningConfigError
from vllm_pp.tools.calibrate import prepare_calibration
from vllm_pp.tools.engine import kv_cache_bytes
from vllm_pp.tools.evaluate import PerplexityRun, evaluate_perplexity
from vllm_pp.storage.statistics import ShardOwner, load_statistics, read_metadata

SEQ_LEN, SAMPLES = 64, 8


@pytest.fixture(scope="module")
def texts():
    from vllm_pp.tools.text_data import prepare_text

    return prepare_text(quiet=True)


@pytest.fixture(scope="module")
def calibration(random_models, texts, tmp_path_factory):
    """A calibration file made as the first `make serve` makes it: into the (here temporary) cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vllm_pp.tools.calibrate.cache_root", lambda: cache)
        out = prepare_calibration(random_models["llama-gqa"], num_samples=SAMPLES, seq_len=SEQ_LEN,
                                  batch_size=4, dtype="float32", quiet=True)
    return out, cache


def test_a_cached_calibration_is_made_once(calibration, random_models, monkeypatch, capsys):
    from vllm_pp.tools import cli

    path, cache = calibration
    assert path.parent == cache / "calibration" and path.name == (
        f"{random_models['llama-gqa'].name}-wiki{SAMPLES}x{SEQ_LEN}-seed0-tp1-float32.safetensors")
    monkeypatch.setattr("vllm_pp.tools.calibrate.cache_root", lambda: cache)

    def calibrate(*args, **kwargs):
        raise RuntimeError("calibrated again")

    monkeypatch.setattr("vllm_pp.tools.calibrate.calibrate", calibrate)
    # The command `make serve` runs: the same file, printed alone on stdout.
    assert cli.main(["calibrate", "--model", str(random_models["llama-gqa"]), "--num-samples", str(SAMPLES),
                     "--seq-len", str(SEQ_LEN), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == f"{path}\n"
    # Other settings are another file.
    with pytest.raises(RuntimeError, match="calibrated again"):
        prepare_calibration(random_models["llama-gqa"], num_samples=SAMPLES + 1, seq_len=SEQ_LEN, dtype="float32")


def test_calibration_file_has_every_block(calibration, random_models):
    path, _ = calibration
    metadata = read_metadata(path)
    assert metadata["kind"] == "calibration" and metadata["tensor_parallel_size"] == 1
    assert metadata["model"]["num_key_value_heads"] == 2
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for layer in range(6):  # every layer is recorded, skipped or not
            for kind, width in (("attention", 256), ("mlp", 512)):
                prefix = f"layers.{layer}.{kind}.rank0."
                assert f.get_tensor(prefix + "sq_mean").shape == (SEQ_LEN, width)
                count = f.get_tensor(prefix + "count")
                assert torch.equal(count, torch.full((SEQ_LEN,), SAMPLES))
                sq_mean = f.get_tensor(prefix + "sq_mean").double()
                mean = f.get_tensor(prefix + "mean").double()
                # E[x^2] >= E[x]^2 channel-wise, pooled over positions.
                assert torch.all(sq_mean.mean(0) >= mean.square() - 1e-6)
                assert torch.all(f.get_tensor(prefix + "variance_sum") >= 0)
    assert len(names) == 6 * 2 * 4


def test_calibration_statistics_equal_the_reference_on_the_same_windows(calibration, random_models, texts):
    """Every statistic `vllm-pp calibrate` writes, against the float64 reference's on the
    windows the documented rule picks (seeded offsets, recomputed here from the text)."""
    import random

    from helpers.reference_model import ReferenceModel
    from helpers.reference_probe_pruning import calibration_statistics
    from tokenizers import Tokenizer

    path, _ = calibration
    model = random_models["llama-gqa"]
    metadata = read_metadata(path)
    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(
        texts.calibration.read_text(), add_special_tokens=False).ids
    rng = random.Random(metadata["seed"])
    starts = [rng.randrange(0, len(tokens) - SEQ_LEN) for _ in range(SAMPLES)]
    expected = calibration_statistics(ReferenceModel(model), [tokens[s:s + SEQ_LEN] for s in starts])
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name, value in expected.items():
            # float32 engine against the float64 reference.
            torch.testing.assert_close(f.get_tensor(name).double(), value.double(), rtol=2e-4, atol=1e-6,
                                       msg=name)


def test_statistics_file_mismatches_are_refused(calibration, tmp_path):
    path, _ = calibration
    identity = read_metadata(path)["model"]
    with pytest.raises(ProbePruningConfigError, match="tensor_parallel_size=1, this server runs 2"):
        load_statistics(path, kind="calibration", owner=ShardOwner(identity, 2, 0))
    with pytest.raises(ProbePruningConfigError, match="another model: hidden_size=256, this model has 576"):
        load_statistics(path, kind="calibration", owner=ShardOwner({**identity, "hidden_size": 576}, 1, 0))
    with pytest.raises(ProbePruningConfigError, match="is a 'calibration' file, expected 'history'"):
        load_statistics(path, kind="history", owner=ShardOwner(identity, 1, 0))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProbePruningConfigError, match="truncated or corrupted") as err:
        load_statistics(truncated, kind="calibration", owner=ShardOwner(identity, 1, 0))
    assert "\n" not in str(err.value)
    with pytest.raises(ProbePruningConfigError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def perplexities(random_models, texts, calibration):
    """Perplexity of the tiny model per method at ratio 0.4 (and dense)."""
    results = {}
    for method, ratio in (("dense", 0.0), ("probe", 0.4), ("full-batch", 0.4), ("flap", 0.4), ("wanda-sp", 0.4)):
        run = PerplexityRun(
            model=str(random_models["llama-gqa"]), text=str(texts.evaluation), method=method,
            ratio=ratio, calibration=str(calibration[0]), probe_ratio=None, seq_len=SEQ_LEN,
            num_windows=8, batch_size=4, tensor_parallel_size=1, dtype="float32",
        )
        results[method] = evaluate_perplexity(run).perplexity
    return results


def test_every_method_evaluates(perplexities):
    assert all(math.isfinite(p) and p > 1 for p in perplexities.values()), perplexities
    # Pruning 40% of a random model changes its predictions.
    pruned = {m: p for m, p in perplexities.items() if m != "dense"}
    assert all(abs(p - perplexities["dense"]) > 1e-3 for p in pruned.values()), perplexities


@pytest.mark.parametrize("config, per_token", [
    # LLaMA-GQA: 30 layers x K,V x 3 KV heads x head_dim 64 x 4 bytes.
    ({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576},
     30 * 2 * 3 * 64 * 4),
    # OPT names no KV heads: every head has its own K and V.
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}, 2 * 2 * 4 * 16 * 4),
])
def test_offline_kv_cache_is_sized_to_the_run(tmp_path, config, per_token):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert kv_cache_bytes(str(tmp_path), 8 * 513) == 2 * 8 * 513 * per_token
