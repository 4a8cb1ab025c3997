"""`vllm serve ... --pp-ratio 0.4`, the way users type it, through the openai client."""

import time

import openai
import pytest
from servers import run_vllm, vllm_server

SERVE_FLAGS = ["--max-model-len", "1024", "--no-enable-prefix-caching", "--max-num-seqs", "8"]


def _exercise(base_url: str, model: str) -> None:
    # Pruning decisions depend on the step and on the history the server has
    # accumulated, so repeated requests need not give the same text: check form.
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


@pytest.mark.parametrize("form", ["--model", "positional"])
def test_serve_with_pp_ratio(default_model, form):
    model_args = ["--model", str(default_model)] if form == "--model" else [str(default_model)]
    with vllm_server(model_args + ["--pp-ratio", "0.4", *SERVE_FLAGS]) as url:
        _exercise(url, str(default_model))


@pytest.mark.parametrize(
    "value, message",
    [
        ("1.5", "probe_pruning.ratio=1.5 is invalid: expected a number in [0, 1)"),
        ("abc", "probe_pruning.ratio='abc' is invalid: expected a number"),
    ],
)
def test_bad_pp_ratio_fails_fast(default_model, value, message):
    """The real command (each start costs ~20 s of imports); more values in test_runtime_patches."""
    started = time.monotonic()
    result = run_vllm(["serve", str(default_model), "--pp-ratio", value])
    assert result.returncode != 0
    assert f"argument --pp-ratio: {message}" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60
