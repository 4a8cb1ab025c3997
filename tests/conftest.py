import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# vLLM workers are separate processes: they import the tests' hook modules
# (helpers.selection_hooks) through PYTHONPATH; pytest itself puts tests/ on sys.path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p
)
# A small KV cache keeps several engines within this machine's memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # The project's Triton kernels run in Triton's interpreter on the CPU. Triton reads this
    # when it is first imported (vLLM imports it while the tests are collected), so it is set
    # for the whole run; vLLM's CPU platform runs no Triton kernel either way.
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu",
        help="torch device of the torch-only runtime tests (test_capturable, test_packed_execution, "
             "test_paged_attention); e.g. cuda on a GPU machine without vLLM",
    )


@pytest.fixture(scope="session")
def device(request):
    import torch

    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def default_model() -> Path:
    from vllm_pp.tools.default_model import prepare_default_model

    return prepare_default_model(quiet=True)


@pytest.fixture(scope="session")
def random_models(default_model) -> dict[str, Path]:
    from vllm_pp.tools.random_models import build_random_model

    return {f: build_random_model(f, quiet=True) for f in ("llama-mha", "llama-gqa", "opt")}

# LLM.apply_model ships a function to the workers; tests use it to inspect the
# model each worker built.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
