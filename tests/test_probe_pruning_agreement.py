"""vLLM's Probe Pruning against the independent float64 reference.

vLLM serves a tiny model with PP (``selection_hooks.LoggedProbePruning``: the
plugin's own method, logging each decision) on a calibration file of true
dense statistics computed by the reference. The reference
(``reference_probe_pruning.py``, no ``vllm_pp`` code) replays vLLM's logged
step schedule:

* with vLLM's kept units and probe rows forced, so every step starts from the
  history vLLM had, vLLM's probe rows must be a top-k of the reference's token
  norms and vLLM's kept units a top-k of the reference's PPsp scores (up to
  near-ties);
* with its own decisions, it must reproduce vLLM's prompt logprobs and greedy
  tokens; where its decisions part from vLLM's, the first one that differs must
  be a near-tie (the test then skips, naming it) or the test fails;
* variants of the reference (history ignored, every token probed, history
  never updated) must break the top-k check, so the check can fail.

Full-batch probing is served and checked the same way: it is the reference
with every token probed and the probe's statistic used alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.calibration_files import write_reference_calibration
from helpers.engines import vllm_engine
from helpers.reference_model import ReferenceModel, single_thread, step_forward
from helpers.reference_probe_pruning import ReferenceProbePruning, Run, Settings
from helpers.schedule_replay import decode_mismatch, segment_requests, vllm_generate
from helpers.selection_hooks import fixed_kept_units

PROMPTS = [  # token ids; distinct lengths identify the requests in the schedule log
    [1, 504, 3458, 314, 4649, 314, 253, 1345, 30, 2056, 3325],
    [1, 26049, 282, 3224, 314],
    [1, 504, 1559, 282, 260, 2328, 28, 3132, 1092, 3022, 7373, 30, 378, 1953, 1034, 253],
]
DECODE_STEPS = 6
# History bucket size per family: one row per position (the paper's), and
# buckets of 4 positions, so count-weighted pooling of calibration rows runs.
FAMILIES = {"llama-gqa": 1, "opt": 4}
# The engines served: name -> (family, method logging its decisions
# (helpers/selection_hooks.py), changes to SETTINGS). The reuse engine lets
# decode steps keep a decision made up to 2 steps before (reuse_decode_steps),
# which the reference replays with its own reuse rule. Full-batch probing is
# the reference with every token probed and no fusion.
SERVED = {
    "llama-gqa": ("llama-gqa", "LoggedProbePruning", {}),
    "opt": ("opt", "LoggedProbePruning", {}),
    "llama-gqa-reuse-2": ("llama-gqa", "LoggedProbePruning", {"reuse_decode_steps": 2}),
    "llama-gqa-full-batch": ("llama-gqa", "LoggedFullBatchProbing", {"probe_ratio": 1.0, "fusion": "probe-only"}),
    "opt-strided": ("opt", "LoggedProbePruning", {"probe_selection": "strided"}),
    "llama-gqa-every-decode": ("llama-gqa", "LoggedProbePruning",
                                 {"probe_selection": "strided", "every_decode_token": True}),
}
# Negative controls, per method: reference variants whose decisions the
# engine's must not match.
PP_CONTROLS = {"no-history": {"use_history": False}, "probe-all": {"probe_ratio": 1.0},
               "no-ema-update": {"ema_momentum": 1.0}}
CONTROLS = {
    "LoggedProbePruning": PP_CONTROLS,
    "LoggedFullBatchProbing": {"fused-with-history": {"fusion": "importance-scaled"},
                               "probe-quarter": {"probe_ratio": 0.25}},
}
# Calibration windows of distinct lengths (unequal counts per position); the
# longest prompt decodes past position 17, where only the fallback applies.
CALIBRATION_LENGTHS = (18, 13, 9)
SETTINGS = Settings(
    ratio=0.5,  # 6 layers, 1 skipped: r' = 0.6, 2 of 4 heads and 208 of 512 channels kept
    probe_ratio=0.25,  # 8 of the 32 prefill tokens, 1 of 3 decode tokens
    skip_layers=(0,),
    channel_multiple=16,  # 205 kept channels round up to 208
    ema_momentum=0.9,  # the default 0.99 moves the history too little in 6 steps
    max_model_len=512,
)
# Allowed score shortfall of a kept unit below a pruned one, relative to the
# largest score (float32 in vLLM against float64 here).
TOLERANCE = 1e-4


def _engine_config(method: str, settings: Settings, calibration, decision_log) -> dict:
    return {
        "probe_pruning": {
            "ratio": settings.ratio,
            "method": f"helpers.selection_hooks:{method}",
            "method_options": {"decision_log": str(decision_log)},
            "probe": {"ratio": settings.probe_ratio, "min_tokens": settings.min_tokens,
                      "selection": settings.probe_selection,
                      "every_decode_token": settings.every_decode_token},
            "history": {
                "ema_momentum": settings.ema_momentum,
                "position_bucket_size": settings.bucket_size,
            },
            "calibration": str(calibration),
            "skip_layers": list(settings.skip_layers),
            "channel_multiple": settings.channel_multiple,
            "reuse_decode_steps": settings.reuse_decode_steps,
        }
    }


def _steps(records: list[dict]) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """The logged steps in order: (key, segments as (request, start, length))."""
    schedule = []
    for record in records:
        if not schedule or schedule[-1]["key"] != record["key"]:
            schedule.append({"key": record["key"], "segments": record["segments"]})
        assert record["segments"] == schedule[-1]["segments"], record
    owners = segment_requests(schedule, PROMPTS)
    return [
        (step["key"], [(r, start, length) for r, (start, length) in zip(rs, step["segments"])])
        for step, rs in zip(schedule, owners)
    ]


@dataclass
class Served:
    name: str  # the engine's name in SERVED
    method: str  # its method, a class of helpers/selection_hooks.py
    settings: Settings
    model: ReferenceModel
    calibration: Path
    records: dict  # (key, layer, kind) -> logged decision
    steps: list
    vllm: tuple  # (prompt logprobs, tokens) from vllm_generate
    history: dict  # (layer, kind) -> vLLM's history after serving, [buckets, width]
    replay: Run | None = None  # the reference under vLLM's decisions and tokens
    replay_history: dict | None = None  # (layer, kind) -> the reference's history after the replay

    def reference(self, settings: Settings | None = None) -> ReferenceProbePruning:
        return ReferenceProbePruning(self.model, settings or self.settings, self.calibration)

    def forced(self, probe_rows: bool = True) -> dict:
        keep = ("kept", "probe_rows") if probe_rows else ("kept",)
        return {k: {f: r[f] for f in keep} for k, r in self.records.items()}

    def vllm_tokens(self) -> list[list[int]]:
        return [ids for ids, _ in self.vllm[1]]


@pytest.fixture(scope="module", params=list(SERVED))
def served(request, random_models, tmp_path_factory) -> Served:
    family, method, changes = SERVED[request.param]
    path = random_models[family]
    tmp = tmp_path_factory.mktemp(f"pp-{request.param}")
    settings = dataclasses.replace(SETTINGS, bucket_size=FAMILIES[family], **changes)
    model = ReferenceModel(path)
    calibration = tmp / "calibration.safetensors"
    write_reference_calibration(model, path, calibration, CALIBRATION_LENGTHS)
    log = tmp / "decisions.jsonl"
    config = _engine_config(method, settings, calibration, log)
    with vllm_engine(path, in_process=True, additional_config=config) as llm:
        outputs = vllm_generate(llm, PROMPTS, DECODE_STEPS)
        (history,) = llm.apply_model(_history)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    records = {(r["key"], r["layer"], r["kind"]): r for r in lines}
    assert len(records) == len(lines), "a (step, layer, block) was decided twice"
    served = Served(request.param, method, settings, model, calibration, records, _steps(lines), outputs, history)
    reference = served.reference()
    served.replay = reference.run(
        PROMPTS, served.steps, DECODE_STEPS, forced=served.forced(), forced_tokens=served.vllm_tokens()
    )
    served.replay_history = reference.history
    return served


def _history(model) -> dict:
    """The worker's history, (layer, kind) -> [buckets, width] on the CPU."""
    method = model.probe_pruning.method
    return {(block.layer_index, block.kind): rows.cpu().clone() for block, rows in method.history.items()}


def _not_top_k(values: torch.Tensor, chosen: list[int]) -> float:
    """How far ``chosen`` is from a top-k of ``values``: max unchosen - min chosen, over max |value|.

    <= 0 for an exact top-k; a small positive value is a near-tie.
    """
    others = sorted(set(range(values.numel())) - set(chosen))
    if not chosen or not others:
        return 0.0
    gap = values[others].max() - values[chosen].min()
    return (gap / values.abs().max().clamp(min=1e-300)).item()


def _violations(decisions: dict, records: dict) -> list[tuple]:
    """(step, layer, block) whose logged kept units are not a top-k of the reference's scores."""
    bad = []
    for key, decision in decisions.items():
        kept = records[key]["kept"]
        gap = _not_top_k(decision.scores, kept)
        if len(kept) != len(decision.own_kept) or gap > TOLERANCE:
            bad.append((key, gap))
    return bad


def _first_divergence(own: Run, records: dict) -> tuple[str, tuple, float] | None:
    """Where the reference's own decisions first leave vLLM's: (what, key, gap), or None.

    Up to that decision both runs held the same states and history, so it must
    be a near-tie of the probe rows or of the kept units (``gap``, as
    :func:`_not_top_k`, at most TOLERANCE); the decisions after it may follow from it.
    """
    differing = [k for k, d in own.decisions.items() if d.own_kept != records[k]["kept"]]
    if not differing:
        return None
    first = min(differing)
    decision, record = own.decisions[first], records[first]
    if record["probe_rows"] != decision.own_probe_rows:
        return "probe rows", first, _not_top_k(decision.importance, record["probe_rows"])
    return "kept units", first, _not_top_k(decision.scores, record["kept"])


def test_step_forward_matches_reference_model(random_models):
    """Chunks of several sequences in one step give the logits of each sequence run alone."""
    for family in FAMILIES:
        model = ReferenceModel(random_models[family])
        units = {
            "attention": model.config["num_attention_heads"],
            "mlp": model.config.get("intermediate_size") or model.config["ffn_dim"],
        }

        def kept(layer, kind, key):
            return None if layer == 0 else fixed_kept_units(3, layer, kind, key, units[kind], 1, 0.5)

        def masked(key):
            def block(layer, kind, residual, z, positions):
                if kept(layer, kind, key) is None:
                    return z
                mask = torch.zeros(units[kind], dtype=torch.float64)
                mask[kept(layer, kind, key)] = 1.0
                return z * mask.repeat_interleave(z.shape[1] // units[kind])
            return block

        sequences = [PROMPTS[0] + [42], PROMPTS[2]]
        # Step 0: a whole prompt and a first chunk; step 1: a decode token and the last chunk.
        schedule = [[(0, 0, 11), (1, 0, 7)], [(0, 11, 1), (1, 7, 9)]]
        step_caches = [model.new_cache() for _ in sequences]
        single_caches = [model.new_cache() for _ in sequences]
        with single_thread():
            for key, segments in enumerate(schedule):
                chunks = [(sequences[r][s:s + n], s, step_caches[r]) for r, s, n in segments]
                for (r, s, n), logits in zip(segments, step_forward(model, chunks, masked(key))):
                    want = model.forward(sequences[r][s:s + n], s, single_caches[r], kept, key)
                    assert torch.allclose(logits, want, rtol=0, atol=1e-10), (family, key, r)


def test_every_pruned_block_decides_every_step(served):
    keys = [key for key, _ in served.steps]
    assert len(keys) == len(set(keys)) >= DECODE_STEPS
    reference = served.reference()
    expected = {(k, layer, kind) for k in keys for layer in reference.pruned_layers for kind in ("attention", "mlp")}
    assert set(served.records) == expected
    for (_, _, kind), record in served.records.items():
        assert len(record["kept"]) == reference.kept_count[kind]
        assert record["kept"] == sorted(set(record["kept"]))


def test_decode_steps_reuse_decisions_as_the_reference_does(served):
    """vLLM keeps a decision at exactly the steps the reference's reuse rule names."""
    reused = served.replay.reused_steps
    if served.settings.reuse_decode_steps == 0:
        assert reused == {}
    else:  # decode steps reuse the prefill step's decision, then a decode step's
        first_step = served.steps[0][0]
        assert first_step in reused.values() and len(set(reused.values())) > 1, reused
    for (key, layer, kind), record in served.records.items():
        assert (record["probe_rows"] == []) == (key in reused), (key, layer, kind)
        if key in reused:
            assert record["kept"] == served.records[reused[key], layer, kind]["kept"]


def test_probe_tokens_are_the_selections(served):
    """Top-ranked by residual norm (up to near-ties), or exactly the evenly spaced tokens."""
    exact = 0
    for key, decision in served.replay.decisions.items():
        rows = served.records[key]["probe_rows"]
        assert len(rows) == len(decision.own_probe_rows), key
        if served.settings.probe_selection == "strided":  # and every token where computed
            assert rows == decision.own_probe_rows, key
        else:
            assert _not_top_k(decision.importance, rows) <= TOLERANCE, (key, rows, decision.own_probe_rows)
        exact += rows == decision.own_probe_rows
    print(f"\n{served.name}: probe rows identical in {exact}/{len(served.replay.decisions)} decisions")


def test_kept_units_are_top_k_of_reference_scores(served):
    decisions = served.replay.decisions
    assert set(decisions) == {k for k in served.records if k[0] not in served.replay.reused_steps}
    assert _violations(decisions, served.records) == []
    exact = sum(served.records[k]["kept"] == d.own_kept for k, d in decisions.items())
    print(f"\n{served.name}: kept units identical in {exact}/{len(decisions)} decisions")


def test_history_after_serving_equals_the_reference(served):
    """The history vLLM learned while serving, value for value, against the reference's
    EMA updates under the same decisions; and it moved away from the calibration."""
    if served.method == "LoggedFullBatchProbing":
        pytest.skip("full-batch probing keeps no history")
    start = served.reference()  # a fresh reference holds the calibrated start
    assert set(served.history) == set(served.replay_history)
    for block, rows in served.history.items():
        want = served.replay_history[block]
        assert torch.allclose(rows.double(), want, rtol=1e-5, atol=1e-7), block
        assert not torch.allclose(want, start.history[block], rtol=1e-3, atol=0), block


def test_reference_with_own_decisions_reproduces_vllm_outputs(served):
    own = served.reference().run(PROMPTS, served.steps, DECODE_STEPS)
    divergence = _first_divergence(own, served.records)
    if divergence:
        what, key, gap = divergence
        assert gap <= TOLERANCE, f"{what} of {key} differ beyond a near-tie: gap {gap:.2e} > {TOLERANCE}"
        pytest.skip(f"a near-tie of the {what} of {key} (gap {gap:.2e} <= {TOLERANCE}) sends the runs apart")
    got_prompt, got_tokens = served.vllm
    for got, want in zip(got_prompt, own.prompt_logprobs):
        assert len(got) == len(want)
        assert max(abs(g - w) for g, w in zip(got, want)) < 2e-3, (served.name, got, want)
    assert all(len(ids) == DECODE_STEPS for ids, _ in got_tokens)
    assert decode_mismatch(got_tokens, own.tokens) < 2e-3, (served.name, got_tokens, own.tokens)


def test_own_decisions_check_fails_beyond_a_near_tie(served):
    """Negative control: vLLM's log with one decision swapped for the lowest-scoring
    units is a divergence that test_reference_with_own_decisions_... fails on."""
    own = served.reference().run(PROMPTS, served.steps, DECODE_STEPS)
    key, decision = min(own.decisions.items())
    worst = sorted(range(decision.scores.numel()), key=lambda u: decision.scores[u].item())
    swapped = dict(served.records)
    swapped[key] = {**served.records[key], "kept": sorted(worst[: len(decision.own_kept)])}
    what, where, gap = _first_divergence(own, swapped)
    assert (what, where) == ("kept units", key) and gap > TOLERANCE, (what, where, gap)


def test_check_fails_for_other_semantics(served):
    """Negative controls: references of other semantics (for PP: history ignored,
    every token probed, history never updated; for full-batch probing: fused with
    the history, a quarter of the tokens probed), with vLLM's kept units forced
    and their own probe rows, fail the top-k check against vLLM's decisions."""
    for name, change in CONTROLS[served.method].items():
        variant = served.reference(dataclasses.replace(served.settings, **change))
        run = variant.run(
            PROMPTS, served.steps, DECODE_STEPS,
            forced=served.forced(probe_rows=False), forced_tokens=served.vllm_tokens(),
        )
        violations = _violations(run.decisions, served.records)
        print(f"\n{served.name} {name}: {len(violations)}/{len(run.decisions)} decisions off top-k")
        assert violations, name


def test_tensor_parallel_ranks_decide_as_the_reference_shards(random_models, tmp_path):
    """PP at TP=2: each rank's decisions are the reference's for its shard, its own top
    units among its half of the heads and channels at its own count, over the history
    of its shard of a TP=2 calibration file."""
    settings = dataclasses.replace(SETTINGS, bucket_size=FAMILIES["llama-gqa"], tp_size=2)
    path = random_models["llama-gqa"]
    model = ReferenceModel(path)
    calibration = tmp_path / "calibration-tp2.safetensors"
    write_reference_calibration(model, path, calibration, CALIBRATION_LENGTHS, tp_size=2)
    log = tmp_path / "decisions.jsonl"
    config = _engine_config("LoggedProbePruning", settings, calibration, log)
    with vllm_engine(path, in_process=True, tensor_parallel_size=2, additional_config=config) as llm:
        _, tokens = vllm_generate(llm, PROMPTS, DECODE_STEPS)
    ranks = [[json.loads(line) for line in p.read_text().splitlines()] for p in (log, Path(f"{log}.rank1"))]
    reference = ReferenceProbePruning(model, settings, calibration)
    shard_units = {"attention": reference.heads // 2, "mlp": reference.width // 2}
    records = {}  # (key, layer, kind) -> both ranks' kept units as global indices
    for rank, lines in enumerate(ranks):
        for line in lines:
            key = (line["key"], line["layer"], line["kind"])
            kept = [rank * shard_units[line["kind"]] + u for u in line["kept"]]
            if rank:
                assert line["probe_rows"] == records[key]["probe_rows"], key  # the same residual on both
                records[key]["kept"] += kept
            else:
                records[key] = {**line, "kept": kept}
    assert len(ranks[0]) == len(ranks[1]) == len(records)
    forced = {k: {"kept": r["kept"], "probe_rows": r["probe_rows"]} for k, r in records.items()}
    replay = reference.run(PROMPTS, _steps(ranks[0]), DECODE_STEPS, forced=forced,
                           forced_tokens=[ids for ids, _ in tokens])
    exact, not_global = 0, 0
    for key, decision in replay.decisions.items():
        units = shard_units[key[2]]
        for rank in range(2):
            local = [u - rank * units for u in records[key]["kept"] if rank * units <= u < (rank + 1) * units]
            assert len(local) == reference.kept_count[key[2]] // 2, (key, rank)
            assert _not_top_k(decision.scores[rank * units:(rank + 1) * units], local) <= TOLERANCE, (key, rank)
        exact += records[key]["kept"] == decision.own_kept
        not_global += _not_top_k(decision.scores, records[key]["kept"]) > TOLERANCE
    print(f"\ntp=2: kept units identical in {exact}/{len(replay.decisions)} decisions, "
          f"{not_global} of them not a top-k over both shards")
    # The check tells per-rank choices from one choice over the whole block.
    assert not_global > 0
