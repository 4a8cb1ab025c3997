"""The one validated configuration object of probe pruning.

It travels inside ``VllmConfig.additional_config["probe_pruning"]`` (a plain
JSON dict), so it reaches every worker under mp, tensor parallel and Ray, and
is part of vLLM's config hash. Users write it with ``--pp-ratio`` and friends
(see :mod:`vllm_pp.integration.cli_flags`), with
``--additional-config '{"probe_pruning": {...}}'`` or with
``LLM(..., additional_config={"probe_pruning": {...}})``.

This module imports neither torch nor vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

ADDITIONAL_CONFIG_KEY = "probe_pruning"

PROBE_SELECTIONS = ("strided", "tokens", "requests")
PROBE_ATTENTIONS = ("exact", "probe-only")
HISTORY_FUSIONS = ("importance-scaled", "probe-only", "history-only")
ATTENTION_HEADS = ("auto", "kept", "all")

# The paper never prunes the first three decoder layers (docs/algorithm.md 3.6).
DEFAULT_SKIP_LAYERS = (0, 1, 2)


class ProbePruningConfigError(ValueError):
    """A bad probe-pruning setting; the message is one line naming value and range."""


def _number(
    name: str, value: Any, low: float, high: float, *, high_open: bool, low_open: bool = False
) -> float:
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProbePruningConfigError(
            f"probe_pruning.{name}={value!r} is invalid: expected a number in {allowed}"
        )
    value = float(value)
    too_high = value >= high if high_open else value > high
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or too_high:
        raise ProbePruningConfigError(
            f"probe_pruning.{name}={value!r} is invalid: expected a number in {allowed}"
        )
    return value


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ProbePruningConfigError(
            f"probe_pruning.{name}={value!r} is invalid: expected one of {', '.join(allowed)}"
        )
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProbePruningConfigError(
            f"probe_pruning.{name}={value!r} is invalid: expected an integer >= 1"
        )
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProbePruningConfigError(f"probe_pruning.{name}={value!r} is invalid: expected true or false")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProbePruningConfigError(
            f"probe_pruning.{name}={value!r} is invalid: expected an integer >= 0"
        )
    return value


@dataclass(frozen=True)
class ProbeConfig:
    """How many of a step's tokens run ahead through each pruned block."""

    # "strided": the `ratio` share of the step's tokens, evenly spaced over the
    # step: a sample of the step (docs/design.md, "Probe selection").
    # "tokens": that share, the step's tokens of largest residual norm.
    # "requests": the paper's two stages with requests as samples: the top
    # `request_token_ratio` of each request's tokens, then the top
    # `request_ratio` of the requests (algorithm/probe.py).
    selection: str = "strided"
    # Share of the step's tokens probed ("tokens", "strided"). The paper probes 1 of 20
    # samples x 50% of its tokens, i.e. 2.5% of the batch's tokens.
    ratio: float = 0.025
    # Lower bound, so that small decode steps still probe something ("tokens", "strided").
    min_tokens: int = 1
    # "requests": share of the step's requests probed (paper: 5% of samples)
    # and share of each probed request's tokens (paper: 50%).
    request_ratio: float = 0.05
    request_token_ratio: float = 0.5
    # The attention probe: "exact" takes the probe tokens' rows of the step's
    # own attention output (every token attends over its real context);
    # "probe-only" is the paper's approximation, attention among the probe
    # tokens only, kept to measure the difference (docs/design.md).
    attention: str = "exact"
    # At decode-only steps, probe every token of a block whose output
    # projection's input the step has already computed for every token
    # (attention on every head): it costs a copy instead of a block run
    # (docs/design.md, "Every decode token where attention computed it").
    every_decode_token: bool = True

    def __post_init__(self) -> None:
        _one_of("probe.selection", self.selection, PROBE_SELECTIONS)
        _one_of("probe.attention", self.attention, PROBE_ATTENTIONS)
        for name in ("ratio", "request_ratio", "request_token_ratio"):
            _number(f"probe.{name}", getattr(self, name), 0.0, 1.0, low_open=True, high_open=False)
        _positive_int("probe.min_tokens", self.min_tokens)
        _boolean("probe.every_decode_token", self.every_decode_token)


@dataclass(frozen=True)
class HistoryConfig:
    """The per-worker history store (docs/algorithm.md 2)."""

    # EMA momentum of the update after full inference (paper: 0.99).
    ema_momentum: float = 0.99
    # Positions share a history row per bucket of this many positions. The
    # paper keeps one row per position (1); buckets of 64 gave the lowest
    # perplexity of the sizes measured (docs/design.md, "History"). 0 keeps one
    # row for all positions.
    position_bucket_size: int = 64
    # How a decision combines probe and history: the paper's importance-scaled
    # fusion, or one source alone (the no-history and no-probe ablations).
    fusion: str = "importance-scaled"
    # Directory of saved history shards (files per TP rank): the newest round every
    # rank holds is loaded at start-up, and rounds are written while serving and at
    # clean shutdown (vllm_pp/storage/history_shards.py).
    path: str | None = None
    # Seconds between checkpoints of the history to ``path`` while serving: the
    # first step boundary after the interval starts a round, which each rank
    # writes in the background. 0: only at clean shutdown.
    checkpoint_seconds: float = 300.0
    # False freezes the history: loaded (from calibration or ``path``) and used,
    # never updated or saved while serving, so the same batch gets the same
    # decisions, hence the same greedy outputs, at any time.
    update: bool = True

    def __post_init__(self) -> None:
        _number("history.ema_momentum", self.ema_momentum, 0.0, 1.0, high_open=True)
        _one_of("history.fusion", self.fusion, HISTORY_FUSIONS)
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ProbePruningConfigError(
                f"probe_pruning.history.path={self.path!r} is invalid: expected a directory path"
            )
        _number("history.checkpoint_seconds", self.checkpoint_seconds, 0.0, math.inf, high_open=True)
        _boolean("history.update", self.update)
        size = self.position_bucket_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProbePruningConfigError(
                f"probe_pruning.history.position_bucket_size={size!r} is invalid: "
                "expected an integer >= 0 (0: one row for all positions)"
            )


@dataclass(frozen=True)
class ProbePruningConfig:
    """Everything a worker needs to decide what to prune."""

    # Share of attention heads and MLP channels pruned, averaged over layers.
    # 0 turns pruning off: the model is then vanilla vLLM.
    ratio: float = 0.0
    # A built-in method's name (vllm_pp/methods/) or "package.module:ClassName";
    # resolved and checked by vllm_pp.methods.method_class.
    method: str = "probe"
    # The method's own options (its Options class, vllm_pp/methods/base.py).
    method_options: Mapping[str, Any] = field(default_factory=dict)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    # Calibration statistics file written by `vllm-pp calibrate`.
    calibration: str | None = None
    # Decoder layers never pruned (all methods).
    skip_layers: tuple[int, ...] = DEFAULT_SKIP_LAYERS
    # Kept MLP channel counts are rounded up to a multiple of this (docs/algorithm.md 3.3).
    channel_multiple: int = 64
    # Performance (docs/design.md, "The probe at decode steps, and decision reuse"): a PP
    # decision stands for up to this many following decode-only steps of the
    # same requests (bounded staleness). A deciding decode step reads all of
    # gate/up for its one-token probe, which reuse spares at a measured cost in
    # decode perplexity. 0 decides at every step, as the paper.
    reuse_decode_steps: int = 15
    # Which query heads a pruned attention block runs the attention kernel on
    # (docs/design.md, "Attention on the kept heads"): "kept" only the kept
    # heads, at every step (vLLM's CPU attention backend); "all" every head
    # (any backend); "auto" the kept heads at steps that prefill where the
    # backend allows it, every head otherwise. The KV cache is written for
    # every head either way.
    attention_heads: str = "auto"

    def __post_init__(self) -> None:
        _number("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if not isinstance(self.method, str) or not self.method:
            raise ProbePruningConfigError(
                f"probe_pruning.method={self.method!r} is invalid: expected a method name "
                "or 'package.module:ClassName'"
            )
        if not isinstance(self.method_options, Mapping):
            raise ProbePruningConfigError(
                f"probe_pruning.method_options={self.method_options!r} is invalid: "
                "expected a JSON object"
            )
        skip = self.skip_layers
        if not isinstance(skip, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in skip
        ):
            raise ProbePruningConfigError(
                f"probe_pruning.skip_layers={skip!r} is invalid: expected a list of "
                "layer indices >= 0"
            )
        object.__setattr__(self, "skip_layers", tuple(sorted(set(skip))))
        _positive_int("channel_multiple", self.channel_multiple)
        _non_negative_int("reuse_decode_steps", self.reuse_decode_steps)
        _one_of("attention_heads", self.attention_heads, ATTENTION_HEADS)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ProbePruningConfig":
        """Build from the JSON dict users write; unknown keys are errors."""
        if not isinstance(raw, Mapping):
            raise ProbePruningConfigError(
                f"additional_config.{ADDITIONAL_CONFIG_KEY}={raw!r} is invalid: "
                "expected a JSON object"
            )
        kwargs = _known_fields(cls, raw, prefix="")
        for name, sub_cls in (("probe", ProbeConfig), ("history", HistoryConfig)):
            if name in kwargs:
                kwargs[name] = sub_cls(**_known_fields(sub_cls, kwargs[name], f"{name}."))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["skip_layers"] = list(self.skip_layers)
        raw["method_options"] = dict(self.method_options)
        return raw

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> "ProbePruningConfig":
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        return cls() if raw is None else cls.from_dict(raw)


def _known_fields(cls: type, raw: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ProbePruningConfigError(
            f"probe_pruning.{prefix.rstrip('.')}={raw!r} is invalid: expected a JSON object"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ProbePruningConfigError(
                f"probe_pruning.{prefix}{key} is not a setting: expected one of "
                + ", ".join(f"{prefix}{n}" for n in names)
            )
    return dict(raw)
