"""PP's per-block budgets (method_options.allocation): "uniform" and "calibrated".

Torch only: the method is built on hand-made blocks and a calibration file
written here, and its kept counts are read after prepare().
"""

from __future__ import annotations

import pytest
import torch

from vllm_pp.algorithm.selection import (
    flap_unit_costs,
    layer_ratio,
    num_kept_channels,
    num_kept_heads,
)
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods.base import PrunableBlock, WorkerInfo
from vllm_pp.methods.full_batch import FullBatchProbing
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.storage.statistics import save_statistics, tensor_name

LAYERS, HIDDEN, HEADS, HEAD_DIM, WIDTH, POSITIONS = 6, 32, 8, 4, 96, 16
SKIPPED = (0,)
IDENTITY = {"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "intermediate_size": WIDTH, "vocab_size": 100}
WORKER = WorkerInfo(LAYERS, 0, 1, IDENTITY, max_model_len=POSITIONS)


def _blocks() -> list[PrunableBlock]:
    blocks = []
    for layer in range(LAYERS):
        if layer not in SKIPPED:
            blocks += [PrunableBlock(layer, "attention", HEADS * HEAD_DIM, HEAD_DIM),
                       PrunableBlock(layer, "mlp", WIDTH)]
    return blocks


def _statistics(seed: int = 0, scale: dict | None = None) -> dict[PrunableBlock, torch.Tensor]:
    """A [width] E[x^2] per block: random, times ``scale[block]`` (a number or a [width] tensor)."""
    generator = torch.Generator().manual_seed(seed)
    stats = {b: torch.rand(b.width, generator=generator) + 0.05 for b in _blocks()}
    return {b: s * (scale or {}).get(b, 1.0) for b, s in stats.items()}


def _weights(seed: int = 1) -> dict[PrunableBlock, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randn(HIDDEN, b.width, generator=generator) for b in _blocks()}


def _calibration_file(path, stats: dict[PrunableBlock, torch.Tensor]) -> str:
    tensors = {}
    for block, sq_mean in stats.items():
        name = lambda stat: tensor_name(block.layer_index, block.kind, 0, stat)  # noqa: E731
        tensors[name("sq_mean")] = sq_mean.expand(POSITIONS, -1).clone()  # [positions, width]
        tensors[name("count")] = torch.full((POSITIONS,), 8.0)
        tensors[name("mean")] = torch.zeros(block.width)
        tensors[name("variance_sum")] = sq_mean.clone()
    metadata = {"kind": "calibration", "model": IDENTITY, "tensor_parallel_size": 1, "seq_len": POSITIONS}
    save_statistics(path, tensors, metadata)
    return str(path)


def _method(ratio=0.4, calibration=None, multiple=8, cls=ProbePruningMethod, weights=None, **options):
    config = ProbePruningConfig.from_dict({
        "ratio": ratio, "calibration": calibration, "skip_layers": list(SKIPPED),
        "channel_multiple": multiple, "method_options": options,
    })
    method = cls(config, _blocks(), WORKER)
    method.prepare(weights or _weights())
    return method


def _by_kind(method) -> tuple[list[int], list[int]]:
    counts = method.kept_counts
    return ([counts[b] for b in method.blocks if b.kind == "attention"],
            [counts[b] for b in method.blocks if b.kind == "mlp"])


def _removed_cost_share(method) -> float:
    """Share of the pruned blocks' head and channel cost (FLAP's accounting) the counts remove."""
    head_cost, channel_cost = flap_unit_costs(IDENTITY, HIDDEN, HEAD_DIM, POSITIONS)
    heads, channels = _by_kind(method)
    total = len(heads) * (HEADS * head_cost + WIDTH * channel_cost)
    removed = sum(HEADS - k for k in heads) * head_cost + sum(WIDTH - k for k in channels) * channel_cost
    return removed / total


def test_uniform_is_todays_counts(tmp_path):
    calibration = _calibration_file(tmp_path / "c.safetensors", _statistics())
    r = layer_ratio(0.4, LAYERS, len(SKIPPED))
    today = ([num_kept_heads(HEADS, r)] * (LAYERS - 1), [num_kept_channels(WIDTH, r, 8)] * (LAYERS - 1))
    for method in (_method(), _method(calibration=calibration),
                   _method(calibration=calibration, allocation="uniform")):
        assert _by_kind(method) == today
        assert method.unit_budgets == {}


@pytest.mark.parametrize("ratio, multiple", [(0.2, 1), (0.4, 1), (0.4, 8), (0.6, 16)])
def test_calibrated_removes_the_uniform_share_of_the_cost(tmp_path, ratio, multiple):
    """Compute-matched: the calibrated counts remove what the uniform counts remove, or just above."""
    calibration = _calibration_file(tmp_path / "c.safetensors", _statistics())
    calibrated = _method(ratio, calibration, multiple, allocation="calibrated")
    uniform = _method(ratio, calibration, multiple)
    heads, channels = _by_kind(calibrated)
    assert len(set(heads)) > 1 or len(set(channels)) > 1  # not uniform
    assert all(k % multiple == 0 for k in channels) and min(heads) >= 1
    head_cost, channel_cost = flap_unit_costs(IDENTITY, HIDDEN, HEAD_DIM, POSITIONS)
    total = (LAYERS - len(SKIPPED)) * (HEADS * head_cost + WIDTH * channel_cost)
    # Above by less than the coarsest step the counts move in: one head, or
    # one channel multiple.
    step = max(head_cost, multiple * channel_cost) / total
    target = _removed_cost_share(uniform)
    assert target <= _removed_cost_share(calibrated) < target + step
    # Never more than the layer ratio's share of the cost.
    assert _removed_cost_share(uniform) <= layer_ratio(ratio, LAYERS, len(SKIPPED))


def test_scaling_a_layer_changes_nothing(tmp_path):
    """FLAP standardises each block's scores before pooling: only their shape counts."""
    base = _calibration_file(tmp_path / "a.safetensors", _statistics())
    blocks = _blocks()
    scaled = _calibration_file(tmp_path / "b.safetensors",
                               _statistics(scale={blocks[1]: 100.0, blocks[4]: 0.01}))
    assert (_method(calibration=base, allocation="calibrated").kept_counts
            == _method(calibration=scaled, allocation="calibrated").kept_counts)


def test_a_layer_with_larger_statistics_keeps_more(tmp_path):
    """A block whose E[x^2] is raised on most of its units keeps more of them.

    The block's top 7/8 units (whole heads for attention) go from
    U(0.05, 1.05) to about 5, its weakest eighth stays. After standardisation
    its bulk sits above its mean (z about +0.4), above the pooled cut, while an
    unchanged block loses its lower ~40%. Weights of equal column norms, so
    PPsp orders units as E[x^2] does.
    """
    blocks = _blocks()
    stats = _statistics()
    ones = {b: torch.ones(HIDDEN, b.width) for b in blocks}
    for favoured in (blocks[5], blocks[2]):  # an MLP block, an attention block
        units = stats[favoured].view(favoured.num_units, favoured.head_dim)  # [units, head_dim]
        ranks = units.mean(dim=1).argsort().argsort()  # [units] rank of each head / channel
        top = (ranks >= favoured.num_units // 8).repeat_interleave(favoured.head_dim)  # [width]
        raised = torch.where(top, (5.0 + 0.1 * stats[favoured]) / stats[favoured], 1.0)
        calibration = _calibration_file(tmp_path / f"{favoured.kind}.safetensors",
                                        _statistics(scale={favoured: raised}))
        method = _method(calibration=calibration, multiple=1, weights=ones, allocation="calibrated")
        others = [method.kept_counts[b] for b in blocks if b.kind == favoured.kind and b != favoured]
        assert method.kept_counts[favoured] > max(others)
        assert method.kept_counts[favoured] >= favoured.num_units * 7 // 8


def test_calibrated_with_whole_kv_groups(tmp_path):
    """head_groups "kv" rounds each calibrated head budget to whole groups."""
    calibration = _calibration_file(tmp_path / "c.safetensors", _statistics())
    budgets = _method(calibration=calibration, allocation="calibrated").unit_budgets
    grouped = [PrunableBlock(b.layer_index, b.kind, b.width, b.head_dim,
                             HEADS // 2 if b.kind == "attention" else 0) for b in _blocks()]
    config = ProbePruningConfig.from_dict({
        "ratio": 0.4, "calibration": calibration, "skip_layers": list(SKIPPED), "channel_multiple": 8,
        "method_options": {"allocation": "calibrated", "head_groups": "kv"}})
    identity = {**IDENTITY, "num_key_value_heads": HEADS // 2}
    method = ProbePruningMethod(config, grouped, WorkerInfo(LAYERS, 0, 1, identity, max_model_len=POSITIONS))
    method.unit_budgets = {g: budgets[b] for g, b in zip(grouped, _blocks())}
    for block in grouped:
        count = method._kept_count(block)
        if block.kind == "attention":
            assert count % 2 == 0 and abs(count - budgets[_blocks()[grouped.index(block)]]) <= 1


def test_full_batch_takes_the_budgets_too(tmp_path):
    calibration = _calibration_file(tmp_path / "c.safetensors", _statistics())
    probe = _method(calibration=calibration, allocation="calibrated")
    full = _method(calibration=calibration, cls=FullBatchProbing, allocation="calibrated")
    assert probe.kept_counts == full.kept_counts


@pytest.mark.parametrize("options, calibrated, message", [
    ({"allocation": "flap"}, True,
     "probe_pruning.method_options.allocation='flap' is invalid: expected one of 'uniform', 'calibrated'"),
    ({"allocation": None}, True,
     "probe_pruning.method_options.allocation=None is invalid: expected one of 'uniform', 'calibrated'"),
    ({"allocation": "calibrated"}, False,
     "probe_pruning.method_options.allocation='calibrated' needs a calibration file "
     "(--pp-calibration PATH, written by `vllm-pp calibrate`)"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, options, calibrated, message):
    calibration = _calibration_file(tmp_path / "c.safetensors", _statistics()) if calibrated else None
    config = ProbePruningConfig.from_dict({"ratio": 0.4, "calibration": calibration, "method_options": options})
    with pytest.raises(ProbePruningConfigError) as error:
        ProbePruningMethod.check_config(config)
    assert str(error.value) == message and "\n" not in message
    with pytest.raises(ProbePruningConfigError, match="allocation"):
        ProbePruningMethod(config, _blocks(), WORKER)


@pytest.mark.parametrize(
    ("identity", "head_cost", "channel_cost"),
    [
        ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 8}, 4 * 32 * 4, 3 * 32),
        ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 2}, 2 * 32 * 4, 3 * 32),
        # OPT's config has no KV head count: multi-head attention, q, k, v and out_proj.
        ({"model_type": "opt", "num_attention_heads": 8, "num_key_value_heads": None}, 4 * 32 * 4, 2 * 32),
    ],
    ids=["llama-mha", "llama-gqa", "opt"],
)
def test_flap_unit_costs(identity, head_cost, channel_cost):
    # Per token: the head's projections plus the attention core over 16 positions, 2 * 16 * 4.
    assert flap_unit_costs(identity, 32, 4, 16) == (head_cost + 2 * 16 * 4, channel_cost)
