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


@pytest.fixture(scope="module")
def triton_kernels(device):
    """The project's Triton kernels: compiled on CUDA, in Triton's interpreter on the CPU
    (chosen when a kernel is first made, so the made ones are dropped around the module)."""
    from vllm_pp.runtime import gather_gemm, paged_attention

    def forget_kernels():
        gather_gemm._kernels.cache_clear()
        paged_attention._kernel.cache_clear()

    with pytest.MonkeyPatch.context() as patch:
        if device.type == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        forget_kernels()
        yield
        forget_kernels()


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
