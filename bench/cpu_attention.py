"""What exactness costs on the CPU: the standard cache's decode with one KV head per attention call
(what attention.attention does there, so that every policy agrees bit for bit) vs one call for all heads.

    python bench/cpu_attention.py        # writes bench/results/cpu-attention.json

Embedded SmolLM2-135M-Instruct, fp32, the standard cache filled by a real prefill of random tokens,
then timed decode steps from the same position (reset with `truncate`); the two variants alternate
`--repeats` times on that one cache and each reports its median.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

import attention
import offload
from bench.harness import machine
from generate import load_model, prefill
from offload import StandardCache

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"per_kv_head": attention.attention, "all_heads": attention._attention}


@torch.no_grad()
def decode_tok_s(model, cache, context: int, steps: int) -> float:
    """Decode steps per second from position `context` on, then back to `context` (truncate)."""
    token, pos = torch.tensor([[5]]), torch.tensor([context])
    t0 = time.perf_counter()
    for _ in range(steps):
        model(token, pos, cache)
        pos += 1
    rate = steps / (time.perf_counter() - t0)
    cache.truncate(context)
    return rate


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[100, 2000, 6000])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=9, help="alternating runs per variant; the median is reported")
    opts = p.parse_args()
    model, _ = load_model(None)
    rows = []
    for context in opts.contexts:
        cache = StandardCache(model.args, 1, context + opts.steps, "cpu", torch.float32)
        with torch.no_grad():
            prefill(model, cache, torch.randint(0, model.args.vocab_size, (context,),
                                                generator=torch.Generator().manual_seed(0)))
        runs = {name: [] for name in VARIANTS}
        for _ in range(opts.repeats):  # alternating: a slow spell of the machine hits both alike
            for name, fn in VARIANTS.items():
                offload.attention = fn  # the name StandardCache.attend calls
                runs[name].append(decode_tok_s(model, cache, context, opts.steps))
        offload.attention = VARIANTS["per_kv_head"]
        median = {name: statistics.median(r) for name, r in runs.items()}
        rows.append({"context": context, **{f"{n}_tok_s": v for n, v in median.items()},
                     "ratio": median["per_kv_head"] / median["all_heads"], "runs": runs})
        print(f"context {context:6d}: per KV head {median['per_kv_head']:6.1f} tok/s, all heads "
              f"{median['all_heads']:6.1f} tok/s (medians of {opts.repeats}), ratio {rows[-1]['ratio']:.2f}", flush=True)
    out = ROOT / "bench" / "results" / "cpu-attention.json"
    out.write_text(json.dumps({**machine(), "model": "SmolLM2-135M-Instruct fp32, standard cache", "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
