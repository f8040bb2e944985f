"""The longest context each policy reaches under a GPU memory cap (paper Tables 3 and 5, RTX 4090: 24 GB).

The parent predicts each policy's limit with planner.plan_memory and verifies it here, one process per
policy: the memory fraction is per process, and after an OOM only a fresh process is surely clean.
Verifying means allocating the cache, filling it, one real prefill chunk (the whole prompt for
`standard`) and a few real decode steps at that length.

    python bench/max_context.py head --tokens 524288 --cap 25769803776 --host-budget 100000000000
prints one JSON line: {"ok": true, ...} or {"ok": false, "error": ...}.
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repo's modules and the bench package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from errors import UsageError
from model import ModelArgs
from planner import DEFAULT_PREFILL_CHUNK, activation_reserve, make_cache, plan_memory

from bench.harness import DRY_ARGS, attempt, build_model, context_run, weights_bytes

POLICIES = ("standard", "chunked", "layer", "head")  # standard = offload none, the prompt in one chunk
VERIFY_STEPS = 3


def plan_for(args, dtype, policy, n, cap, weights, host_budget, chunk):
    """What generate.py would plan on a GPU of `cap` bytes: KV gets what weights and one chunk's
    activations leave (the whole prompt's for `standard`). Raises UsageError when n does not fit."""
    budget = cap - weights - activation_reserve(args, dtype, n if policy == "standard" else chunk)
    if budget <= 0:
        raise UsageError("weights and activations alone exceed the cap")
    offload = "none" if policy in ("standard", "chunked") else policy
    return plan_memory(args, n, dtype, offload, gpu_budget=budget, host_available=host_budget)


def limit(args, dtype, policy, n, cap, weights, host_budget, chunk):
    """None if n tokens fit, else what runs out first: 'gpu' or 'host'."""
    try:
        plan = plan_for(args, dtype, policy, n, cap, weights, None, chunk)
    except UsageError:
        return "gpu"
    if plan.store_bytes == 0:
        return None
    if plan.store_bytes > host_budget:
        return "host"
    return None


def predict(args, dtype, policy, cap, weights, host_budget, chunk, step) -> dict:
    """The largest multiple of `step` that the planner accepts, and what stops the next one."""
    fits = lambda m: limit(args, dtype, policy, m * step, cap, weights, host_budget, chunk) is None
    lo, hi = 0, (cap + host_budget) // (args.kv_bytes_per_token(dtype) * step) + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    n = lo * step
    return dict(predicted=n, limited_by=limit(args, dtype, policy, n + step, cap, weights, host_budget, chunk))


def verify_in_subprocess(policy, n, cap, host_budget, chunk, model_name, dry_run, timeout) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), policy, "--tokens", str(n), "--cap", str(cap),
           "--host-budget", str(host_budget), "--chunk", str(chunk), "--model", model_name]
    try:
        p = subprocess.run(cmd + (["--dry-run"] if dry_run else []), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    lines = p.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):  # killed (host OOM: -9) or crashed before printing
        return {"ok": False, "error": f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}"}


def max_contexts(args, dtype, cap, weights, host_budget, chunk, step, model_name, dry_run, clock) -> dict:
    """Predict, then verify (stepping down 15% per failed try, at most 3 tries) every policy."""
    out = {}
    for policy in POLICIES:
        res = predict(args, dtype, policy, cap, weights, host_budget, chunk, step)
        # What the GPU alone would allow with unlimited host RAM: how far each policy could scale.
        res.update(gpu_only=predict(args, dtype, policy, cap, weights, 1 << 60, chunk, step)["predicted"],
                   tokens=None, tries=[])
        n = res["predicted"]
        for _ in range(3):
            if n < step or not clock.allows(5 if dry_run else 60):
                res.setdefault("error", "skipped: time budget" if n >= step else "nothing fits")
                break
            clock.log(f"max_context {policy}: verifying {n} tokens under a {cap / 2**30:.1f} GiB cap")
            timeout = max(60.0, min(300.0, clock.left()))
            v = verify_in_subprocess(policy, n, cap, host_budget, chunk, model_name, dry_run, timeout)
            res["tries"].append({"tokens": n, **v})
            if v.get("ok"):
                res.update(tokens=n, error=None)
                break
            res["error"] = v.get("error")
            print(f"    -> {res['error']}", file=sys.stderr, flush=True)
            n = int(n * 0.85) // step * step
        out[policy] = res
    return out


def worker(opts) -> dict:
    device = torch.device("cpu" if opts.dry_run else "cuda")
    if opts.dry_run:
        torch.set_num_threads(1)  # as bench.py: tiny shapes, threads only add waiting
    dtype = torch.float32 if opts.dry_run else torch.bfloat16
    args = DRY_ARGS if opts.dry_run else ModelArgs.from_name(opts.model)
    if device.type == "cuda":  # before the weights: they count against the cap, as on a real 24 GB card
        torch.cuda.set_per_process_memory_fraction(min(1.0, opts.cap / torch.cuda.get_device_properties(device).total_memory))
    model = build_model(args, device, dtype)
    weights = weights_bytes(model)

    def run():
        t0 = time.perf_counter()
        plan = plan_for(args, dtype, opts.policy, opts.tokens, opts.cap, weights, opts.host_budget, opts.chunk)
        cache = make_cache(replace(plan, device=str(device)), args)  # the dry run puts the GPU's plan on the CPU
        alloc_s = time.perf_counter() - t0
        chunk = opts.tokens if opts.policy == "standard" else opts.chunk
        r = context_run(model, cache, chunk, target_s=0.0, max_steps=VERIFY_STEPS)
        return {"ok": True, "alloc_s": alloc_s, "plan": plan.as_dict(), **r}

    row = attempt(device, run)
    return {"ok": False, **row} if "error" in row else row


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="verify one policy's max context under a GPU memory cap")
    p.add_argument("policy", choices=POLICIES)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--cap", type=int, required=True, help="GPU bytes this process may allocate")
    p.add_argument("--host-budget", type=int, required=True, help="pinned host bytes the plan may use")
    p.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--model", default="Meta-Llama-3-8B")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    print(json.dumps(worker(p.parse_args())))
