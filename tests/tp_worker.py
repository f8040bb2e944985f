"""One rank of the tensor-parallel tests (tests/test_tp.py starts it under torchrun, on the CPU with
gloo): it runs every policy and chunking on its shard and saves what it computed to OUT/rank{r}.pt.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py CKPT OUT
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py CKPT OUT WEIGHTS

With WEIGHTS (int8, int4, or "stored" for a quantized checkpoint's own), the quantized model's logits
and greedy tokens of two policies only.
"""
import sys
from pathlib import Path

import torch

import tensor_parallel
from generate import generate, generate_many, load_model
from planner import make_cache, plan_cache
from tests.test_offload import logits_of as chunked_then_greedy

POLICIES, CHUNKS = ("none", "layer", "head"), (3, 16)
PROMPT = [(7 * i + 3) % 101 for i in range(37)]        # 37 tokens: chunks of 3 and 16 end mid-chunk
QUESTIONS = [PROMPT[:5], PROMPT[10:19], PROMPT[4:5]]    # after PROMPT[:29], of different lengths
DECODE = 6
SEED = 5


def logits_of(model, policy, chunk):
    """Every prompt position's logits from a chunked prefill, then DECODE greedy steps': [T + DECODE, vocab]."""
    cache = make_cache(plan_cache(model.args, len(PROMPT) + DECODE, torch.float32, "cpu", policy), model.args)
    return chunked_then_greedy(model, cache, torch.tensor([PROMPT]), chunk, DECODE)[0]


@torch.no_grad()
def collectives_of_a_decode_step(model):
    """The element counts of the all-reduces of one decode step (tensor_parallel._sum, counted)."""
    cache = make_cache(plan_cache(model.args, 8, torch.float32, "cpu", "head"), model.args)
    model(torch.tensor([PROMPT[:4]]), torch.arange(4), cache)
    sizes, real_sum = [], tensor_parallel._sum
    tensor_parallel._sum = lambda x: sizes.append(x.numel()) or real_sum(x)
    try:
        model(torch.tensor([[PROMPT[4]]]), torch.tensor([4]), cache)
    finally:
        tensor_parallel._sum = real_sum
    return sizes


def quantized(ckpt, out, weights):
    tp = tensor_parallel.init(torch.device("cpu"))
    model, _ = load_model(ckpt, tp=tp, weights=None if weights == "stored" else weights)
    results = {}
    for policy in ("none", "head"):
        results[f"logits {policy}"] = logits_of(model, policy, 16)
        results[f"tokens {policy}"] = generate(model, PROMPT, 24, offload=policy, prefill_chunk=16)
    torch.save(results, Path(out) / f"rank{tp.rank}.pt")
    tensor_parallel.leave()


def main(ckpt, out):
    tp = tensor_parallel.init(torch.device("cpu"))
    model, _ = load_model(ckpt, tp=tp)
    results = {"shard_args": model.args, "collectives": collectives_of_a_decode_step(model)}
    for policy in POLICIES:
        for chunk in CHUNKS:
            results[f"logits {policy} {chunk}"] = logits_of(model, policy, chunk)
            results[f"tokens {policy} {chunk}"] = generate(model, PROMPT, 24, offload=policy, prefill_chunk=chunk)
        results[f"answers {policy}"] = generate_many(model, PROMPT[:29], QUESTIONS, 12, offload=policy, prefill_chunk=4)
    results["sampled"] = generate(model, PROMPT, 24, temperature=1.0, seed=SEED)  # the same draws on every rank
    for speculate in ("lookup", "self"):  # every rank drafts the same tokens and keeps the same ones
        for policy in ("none", "head"):
            results[f"speculated {speculate} {policy}"] = generate(model, PROMPT, 24, offload=policy,
                                                                   speculate=speculate, speculate_k=3, draft_window=12)
    torch.save(results, Path(out) / f"rank{tp.rank}.pt")
    tensor_parallel.leave()


if __name__ == "__main__":
    main(*sys.argv[1:]) if len(sys.argv) == 3 else quantized(*sys.argv[1:])
