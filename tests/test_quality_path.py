"""The quality figures rest on `vllm-pp eval ppl`: its perplexity equals an independent one.

The reference tokenizes the text with the model's own `tokenizer.json` (the
`tokenizers` library, not the project's text code), cuts the same contiguous
windows itself and scores every token after a window's first with the float64
plain-PyTorch forward of tests/helpers/reference_model.py.
"""

import json
import math
import subprocess
import sys

import torch
from helpers.reference_model import ReferenceModel, single_thread

SEQ_LEN, NUM_WINDOWS = 64, 3
# vLLM computes in float32, the reference in float64: the summed NLL of ~190
# tokens agrees to a few parts in a million; 1e-4 relative leaves room, and a
# wrong window, an off-by-one target or a BOS would move it by far more.
RELATIVE_TOLERANCE = 1e-4


def _reference_perplexity(model_dir, text: str) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    reference = ReferenceModel(model_dir)
    nll, count = 0.0, 0
    with single_thread():
        for i in range(NUM_WINDOWS):
            window = tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN]
            logits = reference.forward(window, 0, reference.new_cache(), lambda *_: None, key=0)
            logprobs = torch.log_softmax(logits, dim=-1)  # [SEQ_LEN, vocab] float64
            nll -= sum(logprobs[t - 1, window[t]].item() for t in range(1, SEQ_LEN))
            count += SEQ_LEN - 1
    return math.exp(nll / count), count


def test_eval_ppl_equals_an_independent_perplexity(random_models, tmp_path):
    model = random_models["llama-gqa"]
    text = tmp_path / "text.txt"
    # Enough ordinary prose for 3 windows of 64 tokens, with a document break.
    text.write_text(("The river runs past the old mill, where the miller keeps his accounts "
                     "in a ledger bound with blue thread. " * 12) + "\n\n" + ("Numbers: 3, 14, 159. " * 20))
    out = tmp_path / "ppl.json"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_pp.tools.cli", "eval", "ppl", "--model", str(model), "--text", str(text),
         "--seq-len", str(SEQ_LEN), "--num-windows", str(NUM_WINDOWS), "--batch-size", "2",
         "--dtype", "float32", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    expected, count = _reference_perplexity(model, text.read_text())
    assert measured["num_tokens"] == count == NUM_WINDOWS * (SEQ_LEN - 1)
    assert abs(measured["perplexity"] / expected - 1) < RELATIVE_TOLERANCE, (measured["perplexity"], expected)
