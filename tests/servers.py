"""Running `vllm serve` as a subprocess for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import requests

VLLM = str(Path(sys.executable).parent / "vllm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(args: list[str], *, timeout: float = 300, env: dict | None = None) -> Iterator[str]:
    """Start `vllm serve ARGS` on a free loopback port; yield its base URL."""
    port = free_port()
    log = open(os.environ.get("VLLM_PP_TEST_SERVER_LOG", os.devnull), "ab")
    process = subprocess.Popen(
        [VLLM, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode} during start-up")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout} s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()


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
