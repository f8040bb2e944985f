"""Tensor parallelism through the CLI: one process against `torchrun --nproc-per-node N`, same flags.

    python bench/tensor_parallel.py                 # CPU (gloo): writes bench/results/tensor-parallel-cpu.json
    python bench/tensor_parallel.py --ranks 2 4     # on a machine with 4 GPUs (NCCL): ...-cuda.json

The model has random weights at a shape that N ranks divide (default: 16 layers of 1024, 8 KV heads,
the embedded model's tokenizer), written once to a temporary checkpoint. Each row is a real
`generate.py --json` run, repeated (interleaved with the other rows), reported as the median, with
the ratios of medians to one process in the same run. Every row must give the same tokens: the JSON
says whether they did. On the CPU the ranks share the machine's cores (each rank gets cores / N
threads), so the ratio shows what the all-reduces cost there, not what several GPUs gain.

In the same run, bench/all_reduce.py measures one all-reduce of each group size, and each row puts
the decode step's 2 x n_layer + 2 all-reduces of one hidden state (tensor_parallel.py) at that
latency beside the step time it adds over one process.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repo's modules and the bench package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from safetensors.torch import save_file

from bench.harness import cpu_model
from checkpoint import default_checkpoint
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(dim=1024, n_layer=16, n_head=16, n_kv_head=8, head_dim=64, intermediate_size=4096, vocab_size=49152,
             max_seq_len=8192, rope_base=10000.0, tie_word_embeddings=True)
DOCUMENT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 45


def write_checkpoint(out: Path) -> Path:
    args = ModelArgs(**SHAPE)
    args.to_json(out / "config.json")
    torch.manual_seed(0)
    save_file(Transformer(args).state_dict(), out / "model.safetensors")
    for f in default_checkpoint().glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def threads_per_rank(ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // ranks)


def run_row(ranks: int, argv: list[str]) -> dict:
    threads = threads_per_rank(ranks)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *launcher, "generate.py", *argv, "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{r.stderr[-2000:]}")
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    return {"threads_per_rank": threads, **stats}


def all_reduce_latency(ranks: int) -> dict:
    """bench/all_reduce.py in a group of `ranks`, with the threads a row of that group has."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all_reduce.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(ranks))}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                        "bench/all_reduce.py", str(out)], cwd=ROOT, env=env, capture_output=True, check=True)
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="group sizes to compare with one process")
    p.add_argument("--repeats", type=int, default=3, help="runs per row, interleaved; the median is reported")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--offload", default="head")
    opts = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp))
        (Path(tmp) / "doc.txt").write_text(DOCUMENT)
        argv = ["--checkpoint", str(ckpt), "--prompt-file", str(Path(tmp) / "doc.txt"), "--offload", opts.offload,
                "--max-new-tokens", str(opts.max_new_tokens), "--device", device]
        groups = [1, *opts.ranks]
        runs = {n: [] for n in groups}
        for repeat in range(opts.repeats):  # round robin: a slow spell of the machine hits every row alike
            for n in groups:
                runs[n].append(run_row(n, argv))
                s = runs[n][-1]
                print(f"[{repeat + 1}/{opts.repeats}] {n} rank(s): prefill {s['prefill_s']:.2f} s, decode "
                      f"{s['decode_tok_s']:.1f} tok/s", flush=True)
    rows = []
    for n, stats in runs.items():
        rows.append({"ranks": n, "threads_per_rank": stats[0]["threads_per_rank"],
                     "decode_tok_s": statistics.median(s["decode_tok_s"] for s in stats),
                     "prefill_s": statistics.median(s["prefill_s"] for s in stats),
                     "prompt_tokens": stats[0]["prompt_tokens"], "new_tokens": stats[0]["new_tokens"],
                     "runs": [{k: v for k, v in s.items() if k not in ("text", "new_tokens", "plan")} for s in stats]})
    one = rows[0]
    for row in rows[1:]:
        row["all_reduce"] = all_reduce_latency(row["ranks"])
        smallest = row["all_reduce"]["rows"][0]  # 4 KiB: this shape's hidden state in fp32 (in bf16 on a GPU)
        row["decode_all_reduces_s_per_token"] = (2 * SHAPE["n_layer"] + 2) * smallest["us"] * 1e-6
        row["decode_s_per_token_over_one_process"] = 1 / row["decode_tok_s"] - 1 / one["decode_tok_s"]
        print(f"{row['ranks']} ranks: a decode step takes {row['decode_s_per_token_over_one_process'] * 1e3:.1f} ms more "
              f"than one process; its {2 * SHAPE['n_layer'] + 2} all-reduces at {smallest['us']:.0f} us each are "
              f"{row['decode_all_reduces_s_per_token'] * 1e3:.1f} ms")
    for row in rows:
        row["decode_vs_one_process"] = row["decode_tok_s"] / one["decode_tok_s"]
        row["prefill_vs_one_process"] = one["prefill_s"] / row["prefill_s"]
        row["same_tokens_as_one_process"] = all(s["new_tokens"] == one["new_tokens"] for s in runs[row["ranks"]])
        print(f"{row['ranks']} rank(s) x {row['threads_per_rank']} threads: decode {row['decode_tok_s']:6.1f} tok/s "
              f"({row['decode_vs_one_process']:.2f}x), prefill {row['prefill_s']:.2f} s "
              f"({row['prefill_vs_one_process']:.2f}x), same tokens: {row['same_tokens_as_one_process']}")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpu": cpu_model(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "shape": SHAPE, "argv": argv[2:],
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repeats": opts.repeats, "rows": rows}
    out = ROOT / "bench" / "results" / f"tensor-parallel-{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
