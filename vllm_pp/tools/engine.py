"""The one way the tools, the tests and the benchmarks start and stop vLLM engines and servers.

Engine start-up costs tens of seconds on the CPU, and a shut-down that is
forgotten leaves TP workers (processes or Ray actors) holding memory, so every
caller goes through :func:`start_engine` / :func:`stop_engine`, the
:func:`vllm_engine` context, or :func:`vllm_server` for ``vllm serve``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from vllm import LLM


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def start_engine(
    model: str | Path | None = None,
    *,
    plugin: bool = True,
    in_process: bool = False,
    all_cores: bool = False,
    env: dict[str, str] | None = None,
    engine_args: Any = None,
    **settings,
) -> "LLM":
    """An ``LLM`` on ``model`` with ``settings`` (``LLM``'s keyword arguments), or from ``engine_args``.

    * ``plugin=False`` starts vanilla vLLM (``VLLM_PLUGINS=""``): its engine must
      run in other processes when this one has loaded the plugin.
    * ``in_process`` runs the engine core and the worker in this process (no
      process spawns, ~30 s faster; every queued request is in the first step);
      with tensor parallelism the workers still run in their own processes.
    * ``all_cores`` (in-process, one worker): torch uses every core, since there
      is no scheduler process to reserve one for.
    * ``env``: more variables, set while vLLM builds the engine and its workers
      (which inherit them).
    """
    from vllm import LLM

    variables = dict(env or {})
    if not plugin:
        assert not in_process, "vanilla vLLM needs its own processes next to the plugin"
        variables["VLLM_PLUGINS"] = ""
    if in_process:
        variables["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    tp_size = settings.get("tensor_parallel_size", 1)
    if all_cores and tp_size == 1:
        variables |= {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": str(os.cpu_count())}
    if tp_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM's CPU workers need their threads bound by hand under TP.
        variables["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp_size))
    with environ(**variables):
        if engine_args is not None:
            return LLM.from_engine_args(engine_args)
        return LLM(model=str(model), **settings)


def stop_engine(llm: "LLM") -> None:
    """Shut the engine down now: TP workers must not outlive it."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def vllm_engine(model: str | Path, **options) -> Iterator["LLM"]:
    """:func:`start_engine` for the block, :func:`stop_engine` after it."""
    llm = start_engine(model, **options)
    try:
        yield llm
    finally:
        stop_engine(llm)


def kv_cache_bytes(model: str, num_tokens: int) -> int:
    """KV-cache bytes that hold ``num_tokens`` tokens of ``model`` in float32, twice over.

    An offline run knows how many tokens it keeps: sizing the cache to them
    replaces vLLM's CPU default (92% of the host's memory), so calibration and
    evaluation run next to other work. The factor 2 covers block rounding.
    """
    import json

    config = json.loads((Path(model) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4  # K and V, 4-byte
    return 2 * num_tokens * per_token


# Offline runs: no compile, no prefix cache (a cached prefix would carry another
# step's pruning decisions), seeded.
OFFLINE_SETTINGS = dict(enforce_eager=True, enable_prefix_caching=False, seed=0)


def offline_engine(model: str, probe_pruning: dict, seq_len: int, batch_size: int, **settings):
    """An in-process engine for offline runs (calibration, evaluation), as a context.

    All requests are queued before the first step, so every step holds exactly
    ``batch_size`` full windows of ``seq_len`` tokens (with a background engine
    core the first step races the submission and may hold fewer): step i holds
    windows ``[i*B, (i+1)*B)``. The KV cache holds just those windows.
    """
    return vllm_engine(
        model,
        in_process=True,
        all_cores=True,
        # collective_rpc ships the tools' own functions to TP workers.
        env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
        additional_config={"probe_pruning": probe_pruning},
        max_model_len=seq_len + 1,
        max_num_seqs=batch_size,
        max_num_batched_tokens=batch_size * seq_len,
        kv_cache_memory_bytes=kv_cache_bytes(model, batch_size * (seq_len + 1)),
        **{**OFFLINE_SETTINGS, **settings},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(
    args: list[str], *, env: dict | None = None, log_path: str | Path = os.devnull, timeout: float = 300
) -> tuple[subprocess.Popen, str]:
    """Start ``vllm serve ARGS`` on a free loopback port, in a process group of its
    own (API server, engine core, workers), and wait until it is healthy.

    Returns the process and the base URL; its output goes to ``log_path``.
    """
    port = free_port()
    vllm = str(Path(sys.executable).parent / "vllm")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [vllm, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode} during start-up; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise TimeoutError(f"vllm serve not healthy after {timeout} s; see {log_path}")
        time.sleep(1)


def stop_server(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM (a clean shutdown) and, after ``grace`` seconds, SIGKILL for the whole group."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def vllm_server(
    args: list[str], *, env: dict | None = None, log_path: str | Path = os.devnull, timeout: float = 300
) -> Iterator[str]:
    """``vllm serve ARGS`` until healthy (:func:`launch_server`); yields its base URL
    and stops it cleanly on exit (:func:`stop_server`)."""
    process, url = launch_server(args, env=env, log_path=log_path, timeout=timeout)
    try:
        yield url
    finally:
        stop_server(process)
