"""Attention on the kept query heads only (vllm_pp/integration/cpu_attention.py).

In a real engine step (chunked prefill, prefix-cache hits, decode), the kept
heads' output and the probe tokens' rows computed by KeptHeadsAttention must
equal vLLM's attention of every head. The end-to-end comparisons with the
plain-PyTorch reference (test_pruned_execution, test_probe_pruning_agreement)
run on this path too, since it is the CPU default.
"""

import types

import pytest
import torch
from helpers.engines import vllm_engine
from vllm import SamplingParams

from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.integration.cpu_attention import (
    AttendKeptHeadsOnCpu,
    KeptHeadsAttention,
    attend_after_cache_write,
    choose_attention,
)
from vllm_pp.runtime.attention import AttendEveryHead, kv_head_runs


@pytest.mark.parametrize("heads, group_size, num_kv_heads, runs", [
    ([0, 1, 2, 5, 6, 9], 1, 10, [(0, 3, 1), (5, 7, 1), (9, 10, 1)]),  # MHA: contiguous kept heads
    ([0, 1, 3, 4, 6], 3, 3, [(0, 2, 2), (2, 3, 1)]),  # GQA 3:1, 2 + 2 + 1 kept
    ([0, 1, 6, 7], 3, 3, [(0, 1, 2), (2, 3, 2)]),  # KV head 1 keeps none: skipped
    ([0, 1, 2, 3, 4, 5], 3, 2, [(0, 2, 3)]),  # every head: one call
])
def test_kv_head_runs(heads, group_size, num_kv_heads, runs):
    assert kv_head_runs(heads, group_size, num_kv_heads) == runs


def _choose(setting: str, attention):
    config = ProbePruningConfig.from_dict({"ratio": 0.4, "attention_heads": setting})
    return choose_attention(config, attention, tp_rank=0)


def test_kept_heads_need_the_cpu_backend():
    other_backend = types.SimpleNamespace(impl=object(), layer_name="model.layers.0.self_attn.attn")
    assert isinstance(_choose("auto", other_backend), AttendEveryHead)
    assert isinstance(_choose("all", other_backend), AttendEveryHead)
    with pytest.raises(ProbePruningConfigError) as err:
        _choose("kept", other_backend)
    message = str(err.value)
    assert "attention_heads='kept' is invalid here: attention backend object" in message
    assert "expected 'auto' or 'all'" in message and "\n" not in message


def test_auto_attends_kept_heads_at_steps_that_prefill(monkeypatch):
    monkeypatch.setattr("vllm_pp.integration.cpu_attention.write_kv_cache", lambda *args: None)
    monkeypatch.setattr(KeptHeadsAttention, "__init__", lambda self, *args: None)
    every_head = types.SimpleNamespace()  # the layer's own call: every head's output
    layer = lambda q, k, v: every_head  # noqa: E731

    def kept_heads(setting: str, max_query_len: int) -> bool:
        attend = AttendKeptHeadsOnCpu(every_step=setting == "kept")
        batch = types.SimpleNamespace(is_decode_only=max_query_len == 1)
        step = attend.attend(layer, None, None, None, batch)
        assert isinstance(step, KeptHeadsAttention) or step.output is every_head
        return isinstance(step, KeptHeadsAttention)

    assert kept_heads("auto", 7) and not kept_heads("auto", 1)
    assert kept_heads("kept", 7) and kept_heads("kept", 1)


def test_kept_head_attention_equals_every_head(default_model, monkeypatch):
    """Every call of the kept-head path in a real engine, checked against every head's attention."""
    checks = {"heads": [], "probe": []}
    heads_of, probe_rows = KeptHeadsAttention.heads, KeptHeadsAttention.probe_rows

    def every_head(attention: KeptHeadsAttention) -> torch.Tensor:
        q = attention.q.reshape(attention.q.shape[0], -1)
        return attend_after_cache_write(attention.attention, q, attention.k, attention.v)

    def checked_heads(self, heads, channels):
        got = heads_of(self, heads, channels)
        want = every_head(self).index_select(1, channels)
        runs = len(kv_head_runs(heads.tolist(), self.group_size, self.attention.num_kv_heads))
        checks["heads"].append(((got - want).abs().max().item(), runs, self.batch.max_query_len))
        return got

    def checked_probe_rows(self, rows):
        got = probe_rows(self, rows)
        want = every_head(self).index_select(0, rows)
        context = self.batch.context_lens.max().item()
        checks["probe"].append(((got - want).abs().max().item(), rows.numel(), context))
        return got

    monkeypatch.setattr(KeptHeadsAttention, "heads", checked_heads)
    monkeypatch.setattr(KeptHeadsAttention, "probe_rows", checked_probe_rows)
    shared = list(range(1000, 1300))  # 300 tokens: two full KV blocks to hit the prefix cache
    with vllm_engine(
        default_model, in_process=True, enable_prefix_caching=True, max_num_batched_tokens=128,
        additional_config={"probe_pruning": {"ratio": 0.4, "attention_heads": "kept", "probe": {"ratio": 0.1}}},
    ) as llm:
        assert llm.apply_model(lambda model: type(model.probe_pruning.attention).__name__) == ["AttendKeptHeadsOnCpu"]
        params = SamplingParams(max_tokens=6, temperature=0)
        llm.generate([{"prompt_token_ids": shared + [7, 8, 9]}], params)
        # A cached prefix, prompts chunked at 128 tokens and decode steps beside them.
        llm.generate([{"prompt_token_ids": shared + [11] * n} for n in (5, 40)]
                     + [{"prompt_token_ids": list(range(2000, 2000 + n))} for n in (3, 200)], params)
    heads, probes = checks["heads"], checks["probe"]
    assert heads and probes
    assert max(error for error, _, _ in heads) < 1e-5
    assert max(error for error, _, _ in probes) < 1e-5
    # The paths this must cover: several kernel calls per layer, prefill and
    # decode steps, probe tokens with context from earlier steps.
    assert max(runs for _, runs, _ in heads) >= 2
    assert {query_len > 1 for _, _, query_len in heads} == {True, False}
    assert max(context for _, _, context in probes) >= 128
