"""Validation of the probe-pruning configuration."""

import pytest
from vllm_pp.config import BUILTIN_METHODS, ProbePruningConfig, ProbePruningConfigError


def test_defaults_are_off():
    config = ProbePruningConfig.from_additional_config(None)
    assert not config.enabled and config.skip_layers == (0, 1, 2)


def test_round_trip():
    raw = {"ratio": 0.4, "method": "dense", "probe": {"ratio": 0.05, "min_tokens": 2},
           "history": {"ema_momentum": 0.95}, "skip_layers": [2, 0]}
    config = ProbePruningConfig.from_dict(raw)
    assert config.skip_layers == (0, 2) and config.probe.min_tokens == 2
    assert ProbePruningConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("raw, message", [
    ({"ratio": 1.0}, "probe_pruning.ratio=1.0 is invalid: expected a number in [0, 1)"),
    ({"ratio": float("nan")}, "probe_pruning.ratio=nan is invalid"),
    ({"ratio": "0.4"}, "probe_pruning.ratio='0.4' is invalid"),
    ({"ratio": True}, "probe_pruning.ratio=True is invalid"),
    ({"method": "magic"}, "probe_pruning.method='magic' is invalid: expected one of probe, full-batch, flap, wanda-sp, dense"),
    ({"probe": {"ratio": 0}}, "probe_pruning.probe.ratio=0.0 is invalid"),
    ({"probe": {"selection": "samples"}},
     "probe_pruning.probe.selection='samples' is invalid: expected one of tokens, requests"),
    ({"probe": {"request_ratio": 1.5}}, "probe_pruning.probe.request_ratio=1.5 is invalid"),
    ({"probe": {"attention": "paged"}},
     "probe_pruning.probe.attention='paged' is invalid: expected one of exact, probe-only"),
    ({"history": {"fusion": "mean"}},
     "probe_pruning.history.fusion='mean' is invalid: expected one of importance-scaled, probe-only, history-only"),
    ({"probe": {"request_token_ratio": 0}}, "probe_pruning.probe.request_token_ratio=0.0 is invalid"),
    ({"probe": {"size": 3}}, "probe_pruning.probe.size is not a setting"),
    ({"history": {"ema_momentum": 1}}, "probe_pruning.history.ema_momentum=1.0 is invalid"),
    ({"skip_layers": [-1]}, "probe_pruning.skip_layers=[-1] is invalid"),
    ({"channel_multiple": 0}, "probe_pruning.channel_multiple=0 is invalid"),
    ({"ratios": 0.4}, "probe_pruning.ratios is not a setting"),
    ({"attention_heads": "some"},
     "probe_pruning.attention_heads='some' is invalid: expected one of auto, kept, all"),
])
def test_bad_values_name_the_value_and_the_range(raw, message):
    with pytest.raises(ProbePruningConfigError) as err:
        ProbePruningConfig.from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_builtin_method_names_have_classes():
    from vllm_pp.methods import BUILTIN

    assert set(BUILTIN) == set(BUILTIN_METHODS)
