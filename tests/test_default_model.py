"""The embedded SmolLM2-135M-Instruct, run exactly: it answers, and offloading changes nothing."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import generate, load_model
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.default_model]


@pytest.fixture(scope="module")
def smollm():
    return load_model(None, device="cpu", dtype=torch.float32)


def chat_ids(tokenizer, text):
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_answers_capital_of_france(smollm):
    model, tokenizer = smollm
    ids = generate(model, chat_ids(tokenizer, "What is the capital of France?"), 30, offload="head",
                   stop_ids=tokenizer.stop_ids)
    assert ids[-1] in tokenizer.stop_ids
    assert "Paris" in tokenizer.decode(ids[:-1])


@torch.no_grad()
def test_2k_prompt_500_chunks_head_and_layer_equal_standard(smollm):
    model, tokenizer = smollm
    args = model.args
    rng = random.Random(0)
    words = "river stone light garden number seven quiet market paper window cloud bridge".split()
    text = " ".join(rng.choice(words) for _ in range(2400))
    ids = tokenizer.encode(text)[:2100]
    assert len(ids) == 2100
    n_decode, max_len = 32, len(ids) + 32

    def run(cache):
        logits = [model(torch.tensor([ids[s:s + 500]]), torch.arange(s, min(s + 500, len(ids))), cache,
                        last_only=True)[:, -1] for s in range(0, len(ids), 500)]
        token = logits[-1].argmax(-1, keepdim=True)
        for i in range(n_decode):  # decode steps cross the 2100 -> 2132 range past the last chunk
            logits.append(model(token, torch.tensor([len(ids) + i]), cache)[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits)

    ref = run(StandardCache(args, 1, max_len, "cpu", torch.float32))
    for cache in (HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group_size=1, resident=31),
                  HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group_size=2, resident=0),
                  LayerOffloadCache(args, 1, max_len, "cpu", torch.float32)):
        # Bit for bit: on the CPU every policy attends one KV head per call (attention.attention), so the
        # kernels' thread split, and with it the order of every fp32 sum, is the same in all of them.
        assert torch.equal(run(cache), ref), (type(cache).__name__, getattr(cache, "group_size", None))


def test_passkey_from_a_3900_token_haystack_with_head_offload(smollm):
    model, tokenizer = smollm
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    key = "68147"
    haystack = filler * 80 + f"The pass key is {key}. Remember it. {key} is the pass key. " + filler * 80
    prompt = chat_ids(tokenizer, "There is a pass key hidden in this text. Find it.\n\n" + haystack +
                      "\n\nWhat is the pass key?")
    assert 3500 < len(prompt) < 4200
    ids = generate(model, prompt, 24, offload="head", prefill_chunk=1024, stop_ids=tokenizer.stop_ids)
    assert key in tokenizer.decode(ids)


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_json_contract():
    r = run_cli("--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "16",
                "--offload", "head", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for field in ("text", "new_tokens", "prompt_tokens", "prefill_s", "decode_tok_s", "peak_gpu_mem_bytes",
                  "kv_bytes_gpu", "kv_bytes_cpu", "offload", "plan"):
        assert field in out, field
    assert "Paris" in out["text"] and out["offload"] == "head" and out["peak_gpu_mem_bytes"] is None
    assert out["kv_bytes_cpu"] > 0 and all(isinstance(t, int) for t in out["new_tokens"])
    assert len(r.stdout.strip().splitlines()) == 1  # --json: nothing else on stdout
    if not torch.cuda.is_available():
        assert "runs its CPU path" in r.stderr  # --offload head without CUDA says what it does
