"""Calibration and history files: safetensors tensors plus JSON metadata, never pickle.

One file holds every TP rank's shard. Tensor names are
``layers.{layer}.{kind}.rank{rank}.{stat}``; the metadata records the format,
its version, the model's identity and the TP size, and loading refuses a file
that does not match the model being served. Writes are atomic: a temporary
file in the same directory, fsync, rename; a crash leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_pp.config import ProbePruningConfigError

FORMAT_VERSION = 1
_METADATA_KEY = "vllm_pp"


@dataclass(frozen=True)
class ShardOwner:
    """Whose shard of a statistics file a process reads or writes."""

    identity: dict = field(default_factory=dict)  # model_identity() of the served model
    tp_size: int = 1
    rank: int = 0


def model_identity(hf_config) -> dict[str, Any]:
    """What a statistics file must agree on with the model it is loaded into."""
    return {
        # model_type, not the architecture name: --hf-overrides may rename the latter.
        "model_type": hf_config.model_type,
        "num_hidden_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_key_value_heads": getattr(hf_config, "num_key_value_heads", None),
        "intermediate_size": getattr(hf_config, "intermediate_size", None)
        or getattr(hf_config, "ffn_dim", None),
        "vocab_size": hf_config.vocab_size,
    }


def tensor_name(layer: int, kind: str, rank: int, stat: str) -> str:
    return f"layers.{layer}.{kind}.rank{rank}.{stat}"


def save_statistics(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict) -> None:
    """Write atomically: readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-write (SIGKILL, power loss) leaves its temporary file;
    # each statistics file has one writer, so an old one is garbage.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    header = {_METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **metadata})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=header)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other workers may read it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ProbePruningConfigError(
            f"statistics file {str(path)!r} is a directory: expected a file written by vllm-pp"
        )
    if not path.is_file():
        raise ProbePruningConfigError(f"statistics file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
    except Exception as err:  # safetensors raises several types for damaged files
        raise ProbePruningConfigError(
            f"statistics file {str(path)!r} is not a readable safetensors file "
            f"(truncated or corrupted?): {err}"
        ) from None
    if raw is None:
        raise ProbePruningConfigError(f"statistics file {str(path)!r} has no vllm-pp metadata")
    return json.loads(raw)


def load_statistics(
    path: str | Path, *, kind: str, owner: ShardOwner
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``owner``'s tensors (names without the rank part) and the file's metadata.

    ``kind`` is the file kind ("calibration" or "history"). A file of another
    kind, version, model or TP size is refused with a one-line error.
    """
    metadata = check_metadata(path, kind=kind, owner=owner)
    where = f"statistics file {str(path)!r}"
    marker = f".rank{owner.rank}."
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if marker in name:
                    tensors[name.replace(marker, ".")] = f.get_tensor(name)
    except Exception as err:
        raise ProbePruningConfigError(f"{where} is damaged: {err}") from None
    return tensors, metadata


def check_metadata(path: str | Path, *, kind: str, owner: ShardOwner) -> dict[str, Any]:
    """The file's metadata, refused with a one-line error unless it is a ``kind`` file of
    this format version, made for ``owner``'s model and TP size (reads the header only)."""
    identity, tp_size = owner.identity, owner.tp_size
    metadata = read_metadata(path)
    where = f"statistics file {str(path)!r}"
    if metadata.get("kind") != kind:
        raise ProbePruningConfigError(f"{where} is a {metadata.get('kind')!r} file, expected {kind!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ProbePruningConfigError(
            f"{where} has format version {metadata.get('format_version')}, expected {FORMAT_VERSION}"
        )
    for key, value in identity.items():
        if metadata.get("model", {}).get(key) != value:
            raise ProbePruningConfigError(
                f"{where} was made for another model: {key}={metadata.get('model', {}).get(key)!r}, "
                f"this model has {value!r}"
            )
    if metadata.get("tensor_parallel_size") != tp_size:
        raise ProbePruningConfigError(
            f"{where} was written with tensor_parallel_size={metadata.get('tensor_parallel_size')}, "
            f"this server runs {tp_size}"
        )
    return metadata
