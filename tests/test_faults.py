"""Faults during a run: out of memory and Ctrl-C stop cleanly, report what was done, free the cache."""
import gc
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload
from errors import UsageError
from generate import generate
from tests.test_offload import tiny_model

ROOT = Path(__file__).resolve().parent.parent


class FaultyModel(torch.nn.Module):
    """Wraps a model; its `fail_at`-th forward call raises a new `error()` instead of computing.

    A new exception each time: a kept instance would keep its traceback, and with it the cache.
    """

    def __init__(self, model, fail_at, error):
        super().__init__()
        self.model, self.args, self.tok_embeddings = model, model.args, model.tok_embeddings
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error()
        return self.model(*args, **kw)


def live_caches():
    gc.collect()
    return len(offload._CACHES)


@pytest.mark.parametrize("fail_at,phase", [(2, "prefill"), (6, "decode")])
def test_out_of_memory_names_the_phase_and_frees_the_cache(fail_at, phase):
    model = FaultyModel(tiny_model(4, 2), fail_at, torch.cuda.OutOfMemoryError)
    stats = {}
    with pytest.raises(UsageError, match=f"out of GPU memory during {phase}.*prefill_chunk") as e:
        generate(model, list(range(20)), 10, offload="head", prefill_chunk=8, stats=stats)
    assert e.value.options == ("prefill_chunk", "gpu_kv_budget")  # the CLI shows them as flags
    assert stats["interrupted"] and live_caches() == 0


def test_ctrl_c_during_decode_keeps_tokens_and_stats():
    # 3 prefill chunks, 3 decode steps, then Ctrl-C during the 4th step. Tokens are read one step
    # late, so the prefill's token and those of the first two steps have reached the caller.
    model = FaultyModel(tiny_model(4, 2), 3 + 4, KeyboardInterrupt)
    seen, stats = [], {}
    with pytest.raises(KeyboardInterrupt):
        generate(model, list(range(20)), 50, offload="head", prefill_chunk=8, on_token=seen.append, stats=stats)
    assert len(seen) == 3 and stats["interrupted"] and stats["prefill_s"] is not None
    assert live_caches() == 0


def cli_process(*argv):
    """generate.py as a terminal would start it. A shell that ran this suite as a background job may have
    set SIGINT to ignored, which children inherit and which stops Python from installing its Ctrl-C
    handler; a user's Ctrl-C reaches a process whose SIGINT is at its default."""
    return subprocess.Popen([sys.executable, "generate.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.default_model
def test_sigint_to_the_cli_exits_130_with_partial_output():
    proc = cli_process("--prompt", "Tell me a very long story.", "--max-new-tokens", "3000", "--offload", "head")
    try:
        first = proc.stdout.read(1)  # decoding has started once text streams
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert len(first + rest.strip()) > 0 and "Traceback" not in err
    assert "interrupted" in err and re.search(r", \d+ new tokens?;", err)  # the stats so far


@pytest.mark.slow
@pytest.mark.default_model
def test_sigint_with_json_still_prints_the_json():
    proc = cli_process("--prompt", "Tell me a very long story.", "--max-new-tokens", "3000", "--json")
    try:
        for line in proc.stderr:  # the plan is printed right before generation starts
            if line.startswith("plan:"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"] is True and "Traceback" not in err
