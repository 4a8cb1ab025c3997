"""Validation of the probe-pruning configuration."""

import pytest
from vllm_pp.config import ProbePruningConfig, ProbePruningConfigError
from vllm_pp.methods import BUILTIN, method_class, pruning_enabled
from vllm_pp.methods.base import PruningMethod


def test_defaults_are_off():
    config = ProbePruningConfig.from_additional_config(None)
    assert not pruning_enabled(config) and config.skip_layers == (0, 1, 2)
    # The calibration recorder runs the pruned layers at ratio 0; nothing else does.
    assert pruning_enabled(ProbePruningConfig(method="calibration"))
    assert not pruning_enabled(ProbePruningConfig(method="flap"))


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
    ({"method": ""}, "probe_pruning.method='' is invalid: expected a method name"),
    ({"probe": {"ratio": 0}}, "probe_pruning.probe.ratio=0.0 is invalid: expected a number in (0, 1]"),
    ({"probe": {"ratio": 2}}, "probe_pruning.probe.ratio=2.0 is invalid: expected a number in (0, 1]"),
    ({"probe": {"every_decode_token": "yes"}},
     "probe_pruning.probe.every_decode_token='yes' is invalid: expected true or false"),
    ({"probe": {"selection": "samples"}},
     "probe_pruning.probe.selection='samples' is invalid: expected one of strided, tokens, requests"),
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


def test_methods_are_found_by_name_and_describe_themselves():
    assert set(BUILTIN) == {"probe", "full-batch", "flap", "wanda-sp", "dense", "calibration"}
    assert all(issubclass(cls, PruningMethod) and cls.name == name for name, cls in BUILTIN.items())
    traits = {name: (cls.needs_calibration, cls.keeps_everything, cls.keeps_history) for name, cls in BUILTIN.items()}
    assert traits == {
        "probe": (False, False, True), "full-batch": (False, False, False),
        "flap": (True, False, False), "wanda-sp": (True, False, False),
        "dense": (False, True, False), "calibration": (False, True, False),
    }
    assert BUILTIN["calibration"].exports == "calibration"


@pytest.mark.parametrize("name, message", [
    ("magic", "probe_pruning.method='magic' is invalid: expected one of calibration, dense, flap, "
              "full-batch, probe, wanda-sp, or 'package.module:ClassName'"),
    ("no_such_module:Method", "probe_pruning.method='no_such_module:Method' is invalid: cannot import it"),
    ("vllm_pp.config:ProbePruningConfig", "'ProbePruningConfig' in 'vllm_pp.config' is not a PruningMethod subclass"),
])
def test_bad_method_names_are_one_line(name, message):
    with pytest.raises(ProbePruningConfigError) as err:
        method_class(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_method_refuses_options_it_does_not_have():
    from vllm_pp.methods.base import WorkerInfo

    config = ProbePruningConfig(ratio=0.4, method="calibration", method_options={"max_position": 5})
    with pytest.raises(ProbePruningConfigError, match="method_options.max_position is not an option of "
                                                      "method 'calibration': expected max_positions"):
        BUILTIN["calibration"](config, [], WorkerInfo(num_layers=2, tp_rank=0, tp_size=1))
