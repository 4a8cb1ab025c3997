"""Attention heads kept by whole KV group (``method_options.head_groups: "kv"``).

Under grouped-query attention a decode kernel reads a KV head's cache when any
of its query heads is kept, so only whole pruned groups save reads. The pure
selection (``top_k_head_groups``), the PP method's option, and the method's
decisions against the independent float64 reference
(``reference_probe_pruning.py``) on a tiny random GQA model, without vLLM.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers.reference_model import ReferenceModel, step_forward
from helpers.reference_probe_pruning import ReferenceProbePruning, Settings, output_weight
from safetensors.torch import save_file

from vllm_pp.algorithm.selection import num_kept_groups, top_k_head_groups, top_k_indices
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods import method_class
from vllm_pp.methods.base import Probe, PrunableBlock, StepBatch, WorkerInfo
from vllm_pp.methods.probe import ProbePruningMethod
from vllm_pp.tools.block_stack import synchronisations


def _reference_groups(scores: list[float], group_size: int, kept_groups: int) -> list[int]:
    """Heads of the top groups by summed score, ties to the lower group, ascending."""
    sums = [sum(scores[j * group_size:(j + 1) * group_size]) for j in range(len(scores) // group_size)]
    ranked = sorted(range(len(sums)), key=lambda j: (-sums[j], j))[:kept_groups]
    return [j * group_size + i for j in sorted(ranked) for i in range(group_size)]


# ------------------------------------------------------------ pure selection


@pytest.mark.parametrize(
    "kept_heads, group_size, groups",
    [
        (6, 3, 2),  # SmolLM2 at r' = 0.44: 6 of 9 heads, exactly 2 of 3 groups
        (8, 3, 3),  # SmolLM2 at r' = 0.22: 8/3 = 2.67 rounds to every group
        (18, 4, 5),  # LLaMA-3-8B-like at 0.44: 4.5 rounds half up
        (25, 4, 6),  # LLaMA-3-8B-like at 0.22: 6.25
        (7, 2, 4),  # 3.5: half up
        (1, 3, 1),  # at least one group
        (0, 4, 1),
        (5, 1, 5),  # MHA: the per-head count itself
    ],
)
def test_num_kept_groups_rounds_to_the_nearest_group_halves_up(kept_heads, group_size, groups):
    assert num_kept_groups(kept_heads, group_size) == groups


def test_num_kept_groups_keeps_the_share_within_half_a_group():
    for group_size in range(1, 9):
        for kept in range(0, 65):
            groups = num_kept_groups(kept, group_size)
            assert groups >= 1
            if kept >= group_size / 2:
                assert abs(groups * group_size - kept) <= group_size / 2


def test_top_k_head_groups_hand_example():
    # 9 heads in 3 groups of 3 (SmolLM2's layout). Group sums 6, 1.5, 3: group 0
    # wins although head 4 is the best single head.
    scores = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.5, 0.0, 1.0, 1.0, 1.0])
    assert top_k_heads_list(scores, 3, 6) == [0, 1, 2, 6, 7, 8]
    assert top_k_heads_list(scores, 3, 3) == [0, 1, 2]
    assert top_k_heads_list(scores, 3, 8) == list(range(9))
    # Per-head choice keeps heads of all three groups (no KV head goes unread).
    assert top_k_indices(scores, 6).tolist() == [0, 1, 2, 4, 6, 7]


def top_k_heads_list(scores: torch.Tensor, group_size: int, kept_heads: int) -> list[int]:
    kept = top_k_head_groups(scores, group_size, kept_heads)
    assert kept.dtype == torch.int64
    return kept.tolist()


def test_top_k_head_groups_ties_go_to_the_lower_group():
    # Every group sums to 3: the lowest groups win, whatever the heads inside.
    scores = torch.tensor([1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 0.5, 0.5])
    assert top_k_heads_list(scores, 3, 6) == [0, 1, 2, 3, 4, 5]
    assert top_k_heads_list(scores, 4, 4) == [0, 1, 2, 3]
    # A NaN head makes its group rank lowest (with -inf, as in top_k_indices).
    scores = torch.tensor([float("nan"), 5.0, 0.0, 0.0, -1.0, 0.0])
    assert top_k_heads_list(scores, 2, 4) == [2, 3, 4, 5]


def test_top_k_head_groups_matches_a_reference_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        group_size = int(torch.randint(1, 5, (1,), generator=g))
        num_groups = int(torch.randint(1, 9, (1,), generator=g))
        scores = torch.randint(0, 3, (num_groups * group_size,), generator=g).float()  # ties everywhere
        kept = int(torch.randint(0, num_groups * group_size + 1, (1,), generator=g))
        groups = min(num_groups, num_kept_groups(kept, group_size))
        assert top_k_heads_list(scores, group_size, kept) == _reference_groups(scores.tolist(), group_size, groups)


def test_group_size_one_is_the_per_head_top_k_exactly():
    """MHA: every KV group is one head, so the choice is today's per-head top-k."""
    g = torch.Generator().manual_seed(1)
    for num_heads in (1, 4, 9, 32):
        for scores in (torch.rand(num_heads, generator=g), torch.randint(0, 3, (num_heads,), generator=g).float()):
            for kept in range(1, num_heads + 1):
                assert torch.equal(top_k_head_groups(scores, 1, kept), top_k_indices(scores, kept))


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} synchronises with the device")


def test_top_k_head_groups_never_synchronises():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.2, 0.2, 0.2, 0.0, 0.5, 0.4])
    with synchronisations(_refuse):
        kept = top_k_head_groups(scores, 3, 6)
    assert kept.tolist() == [0, 1, 2, 6, 7, 8]


def test_top_k_head_groups_rejects_partial_groups():
    with pytest.raises(ValueError):
        top_k_head_groups(torch.zeros(8), 3, 4)
    with pytest.raises(ValueError):
        top_k_head_groups(torch.zeros(2, 3), 3, 3)
    with pytest.raises(ValueError):
        num_kept_groups(3, 0)


# ------------------------------------------------------------ the PP option


def _method(head_groups: str | None, blocks: list[PrunableBlock], ratio: float = 0.4, tp_size: int = 1):
    options = {} if head_groups is None else {"head_groups": head_groups}
    config = ProbePruningConfig(ratio=ratio, skip_layers=(), method_options=options, channel_multiple=1)
    worker = WorkerInfo(num_layers=len({b.layer_index for b in blocks}), tp_rank=0, tp_size=tp_size,
                        max_model_len=128)
    return ProbePruningMethod(config, blocks, worker)


def test_block_group_size_per_rank():
    assert PrunableBlock(0, "attention", 9 * 64, 64, num_kv_heads=3).group_size == 3  # SmolLM2
    assert PrunableBlock(0, "attention", 3 * 64, 64, num_kv_heads=1).group_size == 3  # SmolLM2 at TP 3
    # 32 query and 8 KV heads at TP 16: 2 query heads per rank, the KV head replicated.
    assert PrunableBlock(0, "attention", 2 * 128, 128, num_kv_heads=1).group_size == 2
    assert PrunableBlock(0, "attention", 4 * 64, 64).group_size == 1  # MHA, no KV count given
    assert PrunableBlock(0, "mlp", 512).group_size == 1


def test_pp_option_keeps_whole_groups_and_defaults_to_query_heads():
    attention = PrunableBlock(0, "attention", 9 * 2, 2, num_kv_heads=3)
    mlp = PrunableBlock(0, "mlp", 100)
    scores = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.5, 0.0, 1.0, 1.0, 1.0])
    mlp_scores = torch.arange(100.0)
    default, query, kv = (_method(h, [attention, mlp]) for h in (None, "query", "kv"))
    # r' = 0.4: 9 - floor(3.6) = 6 heads, 2 whole groups.
    for method in (default, query, kv):
        assert method.kept_counts[attention] == 6 and method.kept_counts[mlp] == 60
        assert torch.equal(method._select(mlp, mlp_scores), top_k_indices(mlp_scores, 60))
    assert default.head_groups == "query"
    assert default._select(attention, scores).tolist() == [0, 1, 2, 4, 6, 7]
    assert query._select(attention, scores).tolist() == [0, 1, 2, 4, 6, 7]
    assert kv._select(attention, scores).tolist() == [0, 1, 2, 6, 7, 8]
    kv.capturable = True
    with synchronisations(_refuse):  # the capturable step path's selection
        kv._select(attention, scores)
    # r' = 0.2: 8 heads by query head; by KV group 8/3 rounds to all three groups.
    assert _method("kv", [attention, mlp], ratio=0.2).kept_counts[attention] == 9
    # MHA (group size 1): the same counts and choice as per query head.
    mha = PrunableBlock(0, "attention", 9 * 2, 2, num_kv_heads=9)
    assert _method("kv", [mha]).kept_counts[mha] == 6
    assert _method("kv", [mha])._select(mha, scores).tolist() == [0, 1, 2, 4, 6, 7]


def test_pp_option_groups_are_local_to_the_rank():
    # 32 query / 8 KV heads at TP 2: 16 query heads in 4 groups of 4 on each rank,
    # r' = 0.4: 16 - floor(6.4) = 10 heads, 2.5 groups, halves up to 3 (12 heads).
    block = PrunableBlock(0, "attention", 16 * 4, 4, num_kv_heads=4)
    method = _method("kv", [block], ratio=0.4, tp_size=2)
    assert method.kept_counts[block] == 12
    scores = torch.tensor([0.0] * 4 + [1.0] * 4 + [3.0] * 4 + [2.0] * 4)
    assert method._select(block, scores).tolist() == list(range(4, 16))


def test_pp_option_refuses_bad_values_in_one_line():
    for cls in (method_class("probe"), method_class("full-batch")):
        cls.check_config(ProbePruningConfig(ratio=0.4, method_options={"head_groups": "kv"}))
    with pytest.raises(ProbePruningConfigError) as error:
        method_class("probe").check_config(ProbePruningConfig(ratio=0.4, method_options={"head_groups": "kv-heads"}))
    message = str(error.value)
    assert "\n" not in message
    assert "head_groups='kv-heads'" in message and "'query', 'kv'" in message
    with pytest.raises(ProbePruningConfigError, match="head_groups=3"):
        _method(3, [PrunableBlock(0, "mlp", 8)])
    with pytest.raises(ProbePruningConfigError, match="not an option of method 'flap'"):
        method_class("flap").check_config(
            ProbePruningConfig(ratio=0.4, method="flap", calibration="x", method_options={"head_groups": "kv"})
        )


# ------------------------------------------ decisions against the reference

# A tiny LLaMA with SmolLM2's grouping (groups of 3 query heads) and enough
# groups for a choice: 12 query heads, 4 KV heads. Ratio 0.4 over 4 layers, one
# skipped: r' = 0.53, 12 - floor(6.36) = 6 heads, i.e. 2 of 4 groups.
CONFIG = {
    "model_type": "llama", "hidden_size": 96, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 8, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "vocab_size": 64, "tie_word_embeddings": True,
}
SETTINGS = Settings(ratio=0.4, probe_ratio=0.25, skip_layers=(0,), channel_multiple=8,
                    ema_momentum=0.9, bucket_size=4, max_model_len=64)
PROMPT_LENGTHS = (11, 7, 9)
DECODE_STEPS = 4
TOLERANCE = 1e-4  # relative score shortfall allowed for near-ties (float32 against float64)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory) -> ReferenceModel:
    return _tiny_gqa_model(tmp_path_factory.mktemp("tiny-gqa"))


def _tiny_gqa_model(path) -> ReferenceModel:
    """:data:`CONFIG` with seeded random weights, saved as a Hugging Face directory at ``path``."""
    c = CONFIG
    g = torch.Generator().manual_seed(0)
    hidden, inner, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]

    def normal(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    weights = {"model.embed_tokens.weight": normal(c["vocab_size"], hidden, std=1.0),
               "model.norm.weight": 1 + normal(hidden, std=0.1)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # Heads of unequal strength, so that group sums and single heads rank differently.
        head_scale = torch.rand(heads, generator=g).repeat_interleave(hd)[None] * 2
        weights |= {
            p + "input_layernorm.weight": 1 + normal(hidden, std=0.1),
            p + "post_attention_layernorm.weight": 1 + normal(hidden, std=0.1),
            p + "self_attn.q_proj.weight": normal(heads * hd, hidden),
            p + "self_attn.k_proj.weight": normal(kv * hd, hidden),
            p + "self_attn.v_proj.weight": normal(kv * hd, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * hd) * head_scale,
            p + "mlp.gate_proj.weight": normal(inner, hidden),
            p + "mlp.up_proj.weight": normal(inner, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inner),
        }
    (path / "config.json").write_text(json.dumps(c))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return ReferenceModel(path)


def _schedule() -> tuple[list[list[int]], list[list[int]], list]:
    """Prompts, their decoded tokens, and steps: two prefills, then a third beside decode tokens."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    tokens = [torch.randint(3, CONFIG["vocab_size"], (DECODE_STEPS,), generator=g).tolist() for _ in prompts]
    a, b, c = PROMPT_LENGTHS
    steps = [(0, [(0, 0, a), (1, 0, b)]), (1, [(0, a, 1), (1, b, 1), (2, 0, c)])]
    steps += [(k, [(0, a + k - 1, 1), (1, b + k - 1, 1), (2, c + k - 2, 1)]) for k in range(2, DECODE_STEPS + 1)]
    return prompts, tokens, steps


def _pp_decisions(model: ReferenceModel, head_groups: str) -> dict:
    """The plugin's PP method deciding every block of the schedule, the model run in float64 on its choices.

    Returns ``{(step, layer, kind): {"kept": [...], "probe_rows": [...]}}``.
    """
    c, s = model.config, SETTINGS
    hd = c["head_dim"]
    blocks = {}
    for layer in range(c["num_hidden_layers"]):
        if layer not in s.skip_layers:
            blocks[layer, "attention"] = PrunableBlock(
                layer, "attention", c["num_attention_heads"] * hd, hd, c["num_key_value_heads"])
            blocks[layer, "mlp"] = PrunableBlock(layer, "mlp", c["intermediate_size"])
    config = ProbePruningConfig.from_dict({
        "ratio": s.ratio, "skip_layers": list(s.skip_layers), "channel_multiple": s.channel_multiple,
        "reuse_decode_steps": s.reuse_decode_steps, "method_options": {"head_groups": head_groups},
        "probe": {"ratio": s.probe_ratio, "min_tokens": s.min_tokens, "selection": s.probe_selection},
        "history": {"ema_momentum": s.ema_momentum, "position_bucket_size": s.bucket_size},
    })
    worker = WorkerInfo(num_layers=c["num_hidden_layers"], tp_rank=0, tp_size=1, max_model_len=s.max_model_len)
    method = ProbePruningMethod(config, list(blocks.values()), worker)
    method.prepare({b: output_weight(model, *key).float() for key, b in blocks.items()})

    prompts, tokens, steps = _schedule()
    sequences = [p + t for p, t in zip(prompts, tokens)]
    caches = [model.new_cache() for _ in sequences]
    records = {}
    for key, segments in steps:
        lengths = torch.tensor([n for _, _, n in segments])
        batch = StepBatch(
            index=key, num_tokens=int(lengths.sum()), max_query_len=int(lengths.max()),
            positions=torch.cat([torch.arange(start, start + n) for _, start, n in segments]),
            query_start_loc=torch.cat([torch.zeros(1), lengths.cumsum(0)]).int(),
            seq_lens=torch.tensor([start + n for _, start, n in segments]),
        )

        def run_block(layer, kind, residual, z, positions, batch=batch, key=key):
            if (layer, kind) not in blocks:
                return z
            block, rows = blocks[layer, kind], []

            def probe(probe_rows):
                rows.extend(probe_rows.tolist())
                return z[probe_rows].float()

            kept = method.decide(block, batch, residual.float(), Probe(probe))
            channels = (kept[:, None] * block.head_dim + torch.arange(block.head_dim)).reshape(-1)
            method.update(block, batch, channels, z[:, channels].float())
            records[key, layer, kind] = {"kept": kept.tolist(), "probe_rows": rows}
            mask = torch.zeros(z.shape[1], dtype=z.dtype)
            mask[channels] = 1.0
            return z * mask

        chunks = [(sequences[r][start:start + n], start, caches[r]) for r, start, n in segments]
        step_forward(model, chunks, run_block)
        method.end_step(batch)
    return records


def _shortfall(values: torch.Tensor, chosen: list[int]) -> float:
    """Largest unchosen value minus smallest chosen one, over the largest |value|: <= 0 for a top-k."""
    others = sorted(set(range(values.numel())) - set(chosen))
    if not chosen or not others:
        return 0.0
    return ((values[others].max() - values[chosen].min()) / values.abs().max().clamp(min=1e-300)).item()


def _replay(model: ReferenceModel, records: dict, head_groups: str):
    prompts, tokens, steps = _schedule()
    reference = ReferenceProbePruning(model, dataclasses.replace(SETTINGS, head_groups=head_groups), calibration=None)
    return reference, reference.run(prompts, steps, DECODE_STEPS, forced=records, forced_tokens=tokens)


@pytest.mark.parametrize("head_groups", ["query", "kv"])
def test_pp_decisions_match_the_reference(tiny_gqa, head_groups):
    """Every decision of the plugin's method is the reference's top-k (of heads, or of
    whole groups with "kv"), the reference replaying the method's choices so that each
    decision starts from the history the method had."""
    records = _pp_decisions(tiny_gqa, head_groups)
    reference, run = _replay(tiny_gqa, records, head_groups)
    group = reference.group
    assert group == 3 and set(run.decisions) == set(records) and len(records) == 3 * 2 * (DECODE_STEPS + 1)
    exact = 0
    for key, decision in run.decisions.items():
        kept = records[key]["kept"]
        assert len(kept) == len(decision.own_kept) == reference.kept_count[key[2]], key
        assert _shortfall(decision.importance, records[key]["probe_rows"]) <= TOLERANCE, key
        if key[2] == "attention" and head_groups == "kv":
            groups = [h // group for h in kept[::group]]
            assert kept == [j * group + i for j in groups for i in range(group)], key  # whole groups
            assert _shortfall(decision.group_scores, groups) <= TOLERANCE, key
        else:
            assert _shortfall(decision.scores, kept) <= TOLERANCE, key
        exact += kept == decision.own_kept
    assert exact >= len(records) - 2, f"{exact}/{len(records)} decisions identical"


def test_whole_group_decisions_are_not_per_head_top_k(tiny_gqa):
    """Negative control: the method's "kv" decisions fail the reference's per-head check
    (so the agreement test above tells the two choices apart)."""
    records = _pp_decisions(tiny_gqa, "kv")
    _, run = _replay(tiny_gqa, records, "query")
    off = [key for key, d in run.decisions.items()
           if key[2] == "attention" and _shortfall(d.scores, records[key]["kept"]) > TOLERANCE]
    assert off, "every whole-group decision was also a per-head top-k"
