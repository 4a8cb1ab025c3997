"""Running `vllm serve` as a subprocess for tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

from vllm_pp.tools import engine

VLLM = str(Path(sys.executable).parent / "vllm")


@contextlib.contextmanager
def vllm_server(args: list[str], *, timeout: float = 300, env: dict | None = None) -> Iterator[str]:
    """`vllm serve ARGS` (vllm_pp/tools/engine.py), its output in ``VLLM_PP_TEST_SERVER_LOG`` if set."""
    log_path = os.environ.get("VLLM_PP_TEST_SERVER_LOG", os.devnull)
    with engine.vllm_server(args, env=env, log_path=log_path, timeout=timeout) as url:
        yield url


def run_vllm(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a vllm CLI command that is expected to exit on its own."""
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout)


def exercise_endpoints(base_url: str, model: str) -> None:
    # Pruning decisions depend on the step and on the history the server has
    # accumulated, so repeated requests need not give the same text: check form.
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    prompt = "The capital of France is"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens == 8
    chunks = list(client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
    ))
    assert "".join(c.choices[0].text for c in chunks).strip()
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces).strip()


def metric_samples(base_url: str, name: str, **labels: str) -> list[float]:
    """The values of a metric's samples with these labels, from the server's Prometheus /metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return [
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    ]
