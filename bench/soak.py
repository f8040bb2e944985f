"""Soak test: decode thousands of tokens with head offload and check that memory stays flat.

    python bench/soak.py                      # default model, 4096 new tokens, head offload
    python bench/soak.py --checkpoint DIR --new-tokens 8000 --device cuda

Records process RSS (and, on CUDA, allocated GPU memory) every 100 decode steps. The KV store is
preallocated for the whole run, so after warm-up nothing should grow; a leak per token (a tensor kept
alive per step, an allocation per copy) shows as a steady slope. Writes bench/results/soak-<device>.json.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import machine  # noqa: E402
from checkpoint import resolve_device  # noqa: E402
from generate import generate, load_model  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the ships she guided through the storms."


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--new-tokens", type=int, default=4096)
    p.add_argument("--offload", default="head", choices=["none", "layer", "head"])
    p.add_argument("--device", default=None)
    p.add_argument("--every", type=int, default=100, help="sample memory every N decode steps")
    p.add_argument("--warmup", type=int, default=500, help="steps before memory must be flat")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    opts = p.parse_args()

    device = resolve_device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(opts.checkpoint, device=device, dtype=dtype)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    samples, steps, t0 = [], 0, time.perf_counter()

    def record(_token):
        nonlocal steps
        steps += 1
        if steps % opts.every:
            return
        cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        samples.append({"step": steps, "rss_bytes": rss_bytes(), "cuda_allocated_bytes": cuda,
                        "elapsed_s": time.perf_counter() - t0})
        print(f"step {steps:6d}  rss {samples[-1]['rss_bytes'] / 2**20:8.1f} MiB"
              + (f"  cuda {cuda / 2**20:8.1f} MiB" if cuda is not None else "")
              + f"  {samples[-1]['elapsed_s']:7.1f} s", flush=True)

    stats = {}
    # stop_ids=(): the story must not end early; the soak is about length, not content.
    generate(model, prompt, opts.new_tokens, offload=opts.offload, stop_ids=(), on_token=record, stats=stats)

    after = [s for s in samples if s["step"] >= opts.warmup]
    rss_growth = after[-1]["rss_bytes"] - after[0]["rss_bytes"] if len(after) > 1 else None
    cuda_growth = (after[-1]["cuda_allocated_bytes"] - after[0]["cuda_allocated_bytes"]
                   if len(after) > 1 and device.type == "cuda" else None)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **machine(),
        "offload": opts.offload, "prompt_tokens": len(prompt), "new_tokens": steps,
        "decode_tok_s": stats["decode_tok_s"], "warmup_steps": opts.warmup,
        "rss_growth_after_warmup_bytes": rss_growth, "cuda_growth_after_warmup_bytes": cuda_growth,
        "samples": samples,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"soak-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{steps} tokens at {stats['decode_tok_s']:.1f} tok/s; after step {opts.warmup}: "
          f"RSS grew {rss_growth / 2**20:.1f} MiB"
          + (f", CUDA allocated grew {cuda_growth / 2**20:.1f} MiB" if cuda_growth is not None else "")
          + f"\nwrote {path}")


if __name__ == "__main__":
    main()
