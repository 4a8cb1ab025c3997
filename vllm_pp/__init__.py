"""vllm-pp: Probe Pruning (Le et al., ICLR 2025, arXiv 2502.15618) as a vLLM plugin.

vLLM calls :func:`register` in every process (CLI, engine core, each worker)
through the ``vllm.general_plugins`` entry point ``probe_pruning``.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the probe-pruning architectures and install the runtime hooks.

    Safe to call any number of times in one process.
    """
    # Imported here so that `import vllm_pp` stays cheap and never imports vLLM.
    from vllm_pp.integration.registration import register_architectures
    from vllm_pp.integration.runtime_patches import install_runtime_patches

    register_architectures()
    install_runtime_patches()
