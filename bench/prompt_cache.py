"""Prefill once, ask many: what a prompt cache saves, and how fast it is written and read.

    python bench/prompt_cache.py               # CPU: the embedded model, a ~4K-token document (real CLI runs + API)
    python bench/prompt_cache.py --context 128K   # on CUDA: Llama-3-8B shape, random bf16 weights, head offload
    python bench/prompt_cache.py --dry-run     # a tiny model, every code path, seconds

Two measurements. `cli`: a cold run of question A, then question A with --prompt-cache (writes the
file), then question B with it (reuses the document); prefill_s of B over prefill_s of the cold run
is the point of the feature. `io`: through the API, a prefill of the whole context, its save, a
load after the file's pages are dropped from the page cache (posix_fadvise: read from the disk),
and a load from the page cache; MB/s for each, and the load-to-prefill time ratio. Each loaded
cache must give the cold run's greedy next token.
Writes bench/results/prompt-cache-<device>.json (or --out).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

if __name__ == "__main__":  # run as a script: import the repo's modules and the bench package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bench.harness import DRY_ARGS, build_model, fmt_tokens, machine, parse_tokens
from generate import load_model, prefill
from model import ModelArgs
from planner import make_cache, plan_cache
from prompt_cache import load_prompt_cache, save_prompt_cache

ROOT = Path(__file__).resolve().parent.parent
# ~4K tokens of a made-up town chronicle with facts to ask about, for the embedded model.
DOCUMENT = "".join(f"Year {1700 + i}: the mill at Elder Ford ground {300 + 7 * i} sacks of grain, the river rose "
                   f"{i % 5} feet, and the town kept {2 + i % 9} cats in the granary. " for i in range(110))
QUESTIONS = ("How many sacks did the mill grind in 1750?", "How many cats did the town keep in 1703?")


def cli_rows(repeats: int, workdir: Path) -> dict:
    """Real generate.py runs: cold A, A writing the cache, B reusing it; repeated, interleaved."""
    doc, kv = workdir / "document.txt", workdir / "document.kv"
    doc.write_text(DOCUMENT)
    base = ["--prompt-file", str(doc), "--max-new-tokens", "16", "--offload", "none", "--json"]

    def run(*extra):
        r = subprocess.run([sys.executable, "generate.py", *base, *extra], cwd=ROOT, capture_output=True, text=True,
                           check=True)
        stats = json.loads(r.stdout.strip().splitlines()[-1])
        return {k: stats[k] for k in ("text", "prompt_tokens", "reused_tokens", "prefill_s", "new_tokens")}

    runs = {"cold": [], "writes": [], "reuses": []}
    for i in range(repeats):
        kv.unlink(missing_ok=True)
        runs["cold"].append(run("--prompt", QUESTIONS[1]))
        runs["writes"].append(run("--prompt", QUESTIONS[0], "--prompt-cache", str(kv)))
        runs["reuses"].append(run("--prompt", QUESTIONS[1], "--prompt-cache", str(kv)))
        print(f"[{i + 1}/{repeats}] prefill cold {runs['cold'][-1]['prefill_s']:.2f} s, with the cache "
              f"{runs['reuses'][-1]['prefill_s']:.2f} s ({runs['reuses'][-1]['reused_tokens']} of "
              f"{runs['reuses'][-1]['prompt_tokens']} tokens reused)", flush=True)
        assert runs["reuses"][-1]["new_tokens"] == runs["cold"][-1]["new_tokens"], "reuse changed the answer"
    median = {name: statistics.median(r["prefill_s"] for r in rs) for name, rs in runs.items()}
    return {"document_tokens_approx": runs["cold"][0]["prompt_tokens"], "prefill_s_median": median,
            "reuse_over_cold": median["reuses"] / median["cold"], "answer": runs["reuses"][0]["text"], "runs": runs}


def drop_from_page_cache(path: Path):
    """Evict the file's (clean, synced) pages, so the next read comes from the disk; no root needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@torch.no_grad()
def io_row(model, context: int, policy: str, chunk: int, workdir: Path) -> dict:
    """Prefill `context` tokens, save them, load them twice (from the disk, then the page cache)."""
    args, device, dtype = model.args, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    ids = torch.randint(0, args.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    plan = plan_cache(args, context, dtype, device, policy, prefill_chunk=chunk)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    path = workdir / "context.kv"

    cache = make_cache(plan, args)
    t0 = perf_counter()
    expected = prefill(model, cache, ids, chunk).argmax(-1)
    sync()
    prefill_s = perf_counter() - t0
    t0 = perf_counter()
    size = save_prompt_cache(cache, path, model, ids)
    save_s = perf_counter() - t0
    del cache
    row = dict(context=context, policy=policy, plan=plan.as_dict(), file_bytes=size, prefill_s=prefill_s,
               save_s=save_s, save_mb_s=size / save_s / 1e6)
    for source in ("disk", "page_cache"):
        if source == "disk":
            drop_from_page_cache(path)
        cache = make_cache(plan, args)
        t0 = perf_counter()
        reused, _ = load_prompt_cache(cache, path, model, ids)
        sync()
        row[f"load_{source}_s"] = load_s = perf_counter() - t0
        row[f"load_{source}_mb_s"] = size / load_s / 1e6
        got = prefill(model, cache, ids[reused:], chunk).argmax(-1)  # the last token, as a reusing run does
        assert torch.equal(got, expected), "a loaded cache changed the next token"
        del cache
    row["load_disk_over_prefill"] = row["load_disk_s"] / prefill_s
    path.unlink()
    print(f"{fmt_tokens(context)} tokens, {policy}: prefill {prefill_s:.2f} s; save {size / 1e6:.0f} MB in "
          f"{save_s:.2f} s ({row['save_mb_s']:.0f} MB/s); load from disk {row['load_disk_s']:.2f} s "
          f"({row['load_disk_mb_s']:.0f} MB/s), from the page cache {row['load_page_cache_s']:.2f} s "
          f"({row['load_page_cache_mb_s']:.0f} MB/s); load / prefill {row['load_disk_over_prefill']:.3f}", flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="a tiny random model on the CPU (what CI runs)")
    p.add_argument("--context", default="128K", help="CUDA: tokens of the Llama-3-8B-shape context (default 128K)")
    p.add_argument("--repeats", type=int, default=3, help="CPU: CLI runs per measurement, interleaved (default 3)")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default bench/results/prompt-cache-<device>.json)")
    p.add_argument("--workdir", type=Path, default=None, help="where the cache files go (default: a temp dir)")
    opts = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not opts.dry_run
    device = "cuda" if cuda else "cpu"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", **machine()}
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        workdir = Path(tmp)
        if opts.dry_run:
            model = build_model(DRY_ARGS, "cpu", torch.float32)
            result["io"] = [io_row(model, 300, policy, 64, workdir) for policy in ("none", "head")]
        elif cuda:
            model = build_model(ModelArgs.from_name("Llama-3.1-8B"), "cuda", torch.bfloat16)
            result["io"] = [io_row(model, parse_tokens(opts.context), "head", 8192, workdir)]
        else:
            result["cli"] = cli_rows(opts.repeats, workdir)
            print(f"second question: prefill {result['cli']['reuse_over_cold']:.3f} of a cold run's", flush=True)
            model, _ = load_model(None)
            result["io"] = [io_row(model, result["cli"]["document_tokens_approx"], "none", 512, workdir)]
    out = opts.out or ROOT / "bench" / "results" / f"prompt-cache-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
