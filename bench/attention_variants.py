"""What Gemma-2's soft-capped attention costs on the CPU, by kernel: SDPA (which cannot soft-cap: the
cost of the same shape without it), ours (attention.attention with a soft cap: written out in fp32 over
key blocks) and FlexAttention in eager mode (a score_mod and a bottom-right block mask; without
torch.compile it materializes every score).

    python bench/attention_variants.py     # writes bench/results/attention-variants-cpu.json

Gemma-2-9B's shapes (16 query and 8 KV heads of 256), fp32, one KV head per call as every policy does
on the CPU for ours and SDPA; FlexAttention takes all heads in one call (enable_gqa). Each variant
runs `--repeats` times, alternating, and reports its median; the outputs are compared once.
"""
import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bench.harness import machine, timed
from model import ModelArgs
from attention import attention

ROOT = Path(__file__).resolve().parent.parent


def variants(args: ModelArgs, T: int, S: int):
    """name -> a function of (q, k, v) giving the layer's attention output."""
    cap, scale = args.attn_softcap, args.attention_scale
    block_mask = None if T == 1 else create_block_mask(lambda b, h, qi, ki: ki <= qi + (S - T), None, None, T, S,
                                                       device="cpu")

    def flex(q, k, v):
        with warnings.catch_warnings():  # "called without torch.compile()": that is what is measured
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: torch.tanh(s / cap) * cap,
                                  block_mask=block_mask, scale=scale, enable_gqa=True)

    return {"sdpa_no_softcap": lambda q, k, v: attention(q, k, v, scale=scale),
            "ours_softcap": lambda q, k, v: attention(q, k, v, scale=scale, softcap=cap),
            "flex_eager_softcap": flex}


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x4096", "1x32768", "512x4096"],
                   help="TxS: T queries (1: a decode step, more: a prefill chunk) over S keys")
    p.add_argument("--repeats", type=int, default=5)
    opts = p.parse_args()
    args = ModelArgs.from_name("Gemma-2-9B")
    rows = []
    for shape in opts.shapes:
        T, S = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.n_head, T, args.head_dim, generator=g)
        k, v = (torch.randn(1, args.n_kv_head, S, args.head_dim, generator=g) for _ in range(2))
        fns = variants(args, T, S)
        outs = {name: fn(q, k, v) for name, fn in fns.items()}  # also the warm-up
        runs = {name: [] for name in fns}
        for _ in range(opts.repeats):
            for name, fn in fns.items():
                runs[name].append(timed("cpu", lambda: fn(q, k, v))[1])
        median = {name: statistics.median(r) for name, r in runs.items()}
        row = {"T": T, "S": S, **{f"{n}_ms": 1e3 * m for n, m in median.items()},
               "ours_over_sdpa": median["ours_softcap"] / median["sdpa_no_softcap"],
               "flex_over_ours": median["flex_eager_softcap"] / median["ours_softcap"],
               "max_abs_diff_flex_ours": (outs["flex_eager_softcap"] - outs["ours_softcap"]).abs().max().item(),
               "runs_s": runs}
        rows.append(row)
        print(f"T={T:4d} S={S:6d}: SDPA (no cap) {row['sdpa_no_softcap_ms']:8.2f} ms, ours (cap) "
              f"{row['ours_softcap_ms']:8.2f} ms ({row['ours_over_sdpa']:.2f}x), flex eager (cap) "
              f"{row['flex_eager_softcap_ms']:8.2f} ms ({row['flex_over_ours']:.2f}x ours); "
              f"max |flex - ours| {row['max_abs_diff_flex_ours']:.1e}", flush=True)
    out = ROOT / "bench" / "results" / "attention-variants-cpu.json"
    out.write_text(json.dumps({**machine(),
                               "shapes": "Gemma-2-9B: 16 query / 8 KV heads of 256, fp32, soft cap 50",
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
