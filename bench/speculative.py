"""Speculative decoding: what a verification pass costs, and what each drafter gains, against plain decoding.

    python bench/speculative.py --out bench/results/speculative-cpu.json     # CPU: the embedded model, fp32
    python bench/speculative.py --gpu --out gpu.json                          # GPU: Llama-3-8B shape, streamed
    python bench/speculative.py --dry-run --out /tmp/s.json                   # every path, tiny shapes (CI)

CPU part (the embedded SmolLM2-135M-Instruct in fp32, 2K tokens of context):
- pass: a forward of T = 1 ... 9 tokens over the cache, per policy, as a ratio to T = 1 (medians of
  interleaved repeats); with the few-rows paths (model.FEW_ROWS, attention.FEW_QUERIES) and without,
  which is how every pass ran before them.
- decode: a question about bench/execmodel.txt (the chapter "Execution model" of the Python Language
  Reference, from CPython 3.11's pydoc_data; (c) Python Software Foundation, PSF License), answered
  plainly and with each drafter and k, per policy: decode tok/s against plain decoding in the same
  run (interleaved repeats, medians), tokens per pass, acceptance; the tokens asserted equal.
GPU part: Llama-3-8B's shape with random bf16 weights, head offload with nothing resident, at 32K and
128K: a verification pass of 8 tokens and a `self` draft step, each against a 1-token streamed step;
then the s/token they predict at 128K and 1M for an acceptance rate a (the CPU run's, and MagicDec's 0.8).
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import torch

import attention
import model as model_module
from bench.harness import (DRY_ARGS, K, build_model, fill_cache, fmt_tokens, machine, median_times, parse_parts,
                           parts_parser)
from chat import prompt_text
from generate import decode, load_model, prefill, speculative_decode
from model import ModelArgs
from planner import make_cache, plan_cache, plan_memory
from speculative import DraftCache, make_drafter, room_for

QUESTIONS = {  # kind: the question about the document
    "extractive-quote": "Quote, word for word, the first three sentences of the section 'Structure of a program'.",
    "extractive-list": "Which constructs bind names, according to the text? List them as the text gives them.",
    "summary": "Summarize the text in three sentences.",
    "free-writing": "Forget the text. Write a short story about a lighthouse keeper and a cat.",
}
DRAFTERS = [("lookup", 2), ("lookup", 4), ("lookup", 8), ("self", 2), ("self", 4)]


@torch.no_grad()
def pass_cost(model, ids, policy: str, reps: int, Ts=range(1, 10)) -> list[dict]:
    """The time of one forward pass of T tokens after `ids`, per T, as a ratio to a 1-token step; with
    the few-rows paths on and off (off: what every pass of 2-16 tokens did before them)."""
    cache = make_cache(plan_cache(model.args, len(ids) + 16, torch.float32, "cpu", policy), model.args)
    prefill(model, cache, ids)
    L = cache.length

    def one_pass(T):
        def run():
            model(torch.tensor([ids[-T:]]), torch.arange(L, L + T), cache)
            cache.truncate(L)
        return run

    rows = []
    for few in (True, False):
        model_module.FEW_ROWS, attention.FEW_QUERIES = (16, 16) if few else (0, 0)
        times = median_times({T: one_pass(T) for T in Ts}, reps)
        rows += [dict(policy=policy, context=L, T=T, few_rows_paths=few, seconds=s, vs_one_token=s / times[1])
                 for T, s in times.items()]
    model_module.FEW_ROWS, attention.FEW_QUERIES = 16, 16
    return rows


@torch.no_grad()
def decode_rows(model, tokenizer, document: str, policy: str, new_tokens: int, reps: int, drafters) -> list[dict]:
    """Each question answered plainly and with each (drafter, k), from one prefill; the same tokens."""
    rows = []
    for kind, question in QUESTIONS.items():
        ids = tokenizer.encode(prompt_text(tokenizer, True, question, opening=document))
        cache = make_cache(plan_cache(model.args, len(ids) + new_tokens, torch.float32, "cpu", policy, rollback=8),
                           model.args)
        logits = prefill(model, cache, ids)
        L, answers, counts = cache.length, {}, {}

        def run(name, speculate=None, k=0):
            def go():
                cache.truncate(L)
                if speculate is None:
                    tokens = decode(model, cache, logits, new_tokens)
                else:
                    drafter = make_drafter(speculate, model, cache, k, 512, 0.0, None, None, None, 1)
                    counts[name] = {}
                    tokens = speculative_decode(model, cache, logits, new_tokens, ids, drafter, k, counts=counts[name])
                out = []
                for t in tokens:
                    out.append(t)
                    if t in tokenizer.stop_ids:
                        break
                answers[name] = out
            return go

        fns = {"plain": run("plain")} | {f"{s} k={k}": run(f"{s} k={k}", s, k) for s, k in drafters}
        times = median_times(fns, reps)
        plain = answers["plain"]
        for name, seconds in times.items():
            assert answers[name] == plain, (kind, policy, name)  # exact: the tokens of plain decoding
            c = counts.get(name, {})
            drafted = c.get("drafted_tokens")
            rows.append(dict(question=kind, policy=policy, config=name, context=L, new_tokens=len(plain),
                             seconds=seconds, tok_s=len(plain) / seconds, vs_plain=times["plain"] / seconds,
                             tokens_per_pass=c.get("tokens_per_pass"), drafted=drafted,
                             accepted=c.get("accepted_tokens"),
                             acceptance=c["accepted_tokens"] / drafted if drafted else None))
            print(f"{kind:<17} {policy:<4} {name:<10} {len(plain) / seconds:6.1f} tok/s  x{rows[-1]['vs_plain']:.2f}  "
                  f"tokens/pass {rows[-1]['tokens_per_pass'] or 1:.2f}", flush=True)
        rows[-len(times)]["answer"] = tokenizer.decode(plain)
    return rows


# --- GPU: the pass and the draft step against a streamed step --------------------------------------

def timed(device, fn, reps=3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def gpu_rows(dry: bool, contexts, acceptance: list[float], k: int = 7) -> dict:
    device = torch.device("cpu" if dry else "cuda")
    args = DRY_ARGS if dry else ModelArgs.from_name("Meta-Llama-3-8B")
    dtype = torch.float32 if dry else torch.bfloat16
    model = build_model(args, device, dtype)
    rows = []
    for context in contexts:
        plan = plan_memory(model.args, context + 2 * (k + 1), dtype, "head", device, resident=0, group_size=1,
                           rollback=k)
        cache = make_cache(plan, model.args)
        fill_cache(cache, context)
        drafter = DraftCache(model.args, 512, room_for(k, 1), device, dtype)
        drafter.fill_from(cache)

        def step(T, over):
            def run():
                start = over.length
                model(torch.zeros(1, T, dtype=torch.long, device=device), torch.arange(start, start + T, device=device),
                      over)
                over.truncate(start)
            return run

        one, verify, draft = (timed(device, step(1, cache)), timed(device, step(k + 1, cache)),
                              timed(device, step(1, drafter)))
        row = dict(context=context, one_token_s=one, verify_s=verify, verify_tokens=k + 1, verify_vs_one=verify / one,
                   draft_step_s=draft, draft_vs_streamed=draft / one, streamed_bytes=plan.store_bytes * context //
                   plan.max_len)
        for a in acceptance:  # Leviathan et al.: tokens per pass with k drafts at acceptance a
            per_pass = (1 - a ** (k + 1)) / (1 - a)
            row[f"predicted_s_per_token_a{a}"] = (verify + k * draft) / per_pass
        rows.append(row)
        print(f"{fmt_tokens(context):>6}: 1-token step {one:.3f} s, {k + 1}-token pass {verify:.3f} s "
              f"(x{verify / one:.2f}), self draft step {draft * 1e3:.1f} ms", flush=True)
        del cache, drafter
    longest = rows[-1]
    scale = (K * K) / longest["context"]  # to 1M tokens: the streamed part grows with the context
    predicted = {f"1M a={a}": (longest["verify_s"] * scale + k * longest["draft_step_s"]) * (1 - a) / (1 - a ** (k + 1))
                 for a in acceptance}
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                shape="DRY" if dry else "Meta-Llama-3-8B", k=k, rows=rows, predicted_1M_s_per_token=predicted,
                paper_1M_s_per_token=6.41)


def parse_args(argv=None):
    p = parts_parser(__doc__, "the GPU part (Llama-3-8B shape, head offload, 32K and 128K)")
    p.add_argument("--new-tokens", type=int, default=96, help="most tokens per answer (default 96)")
    p.add_argument("--acceptance", type=float, default=None,
                   help="the GPU part's predictions also for this acceptance rate (e.g. the CPU run's self rate)")
    return parse_parts(p, argv)


def main(argv=None):
    opts = parse_args(argv)
    out = machine()
    if opts.gpu or opts.dry_run:
        contexts = [256, 512] if opts.dry_run else [32 * K, 128 * K]
        out["gpu"] = gpu_rows(opts.dry_run, contexts, [a for a in (opts.acceptance, 0.8) if a is not None])
    if not opts.gpu:
        if opts.dry_run:
            out["pass"] = pass_cost(build_model(DRY_ARGS, "cpu", torch.float32), list(range(200)), "head", reps=1,
                                    Ts=(1, 5))
        else:
            model, tokenizer = load_model(None)
            document = (ROOT / "bench" / "execmodel.txt").read_text()
            ids = tokenizer.encode(document)
            out["pass"] = [row for policy in ("none", "head") for row in pass_cost(model, ids, policy, opts.reps)]
            out["decode"] = [row for policy in ("none", "head")
                             for row in decode_rows(model, tokenizer, document, policy, opts.new_tokens, opts.reps,
                                                    DRAFTERS)]
    Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
