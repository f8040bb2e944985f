"""Many questions, one document: decode tok/s of B questions answered together vs one at a time.

    python bench/many_questions.py                 # CPU: the embedded model, a ~2K-token document, B = 1, 2, 4, 8
    python bench/many_questions.py --context 128K  # CUDA: Llama-3-8B shape, random bf16 weights, every head streamed
    python bench/many_questions.py --dry-run       # a tiny model, every code path, seconds

The document is prefilled once into one cache. `alone`: each question the way generate() answers it,
its tokens appended to the document's cache and decoded one token per step (then truncated away for
the next question). `together`: the first B questions through the pieces generate_many() runs
(SharedPrefixCache, prefill_questions, decode_many), every step reading the document's KV once for
all B. Rates count the tokens decoded after each run's first decode step, over their time; `speedup`
is together's aggregate tok/s over the median tok/s of one question alone. On CUDA, the PCIe bound of
a step (the streamed KV over the H2D bandwidth measured in the same run) comes with each row. In fp32
(the CPU) every answer together must equal the answer alone; bf16 rounds the two paths' attention
differently, so on CUDA the agreement is reported, not required.
Writes bench/results/many-questions-<device>.json (or --out).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter

if __name__ == "__main__":  # run as a script: import the repo's modules and the bench package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from bench.bench import best_time
from bench.harness import DRY_ARGS, build_model, fmt_tokens, machine, parse_tokens, sync
from bench.prompt_cache import DOCUMENT
from chat import prompt_text
from generate import decode, decode_many, load_model, prefill, prefill_questions
from model import ModelArgs
from planner import make_cache, plan_memory
from shared_prefix import SharedPrefixCache, shared_length

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [f"How many sacks did the mill grind in {year}?" for year in (1702, 1711, 1723, 1730)] + \
            [f"How many cats did the town keep in {year}?" for year in (1704, 1715, 1729, 1740)]


def rate(times: list[float], counts: list[int]) -> float | None:
    """Tokens per second after the first decode step: times[i] is when step i's tokens were known."""
    if len(times) < 3:
        return None
    return sum(counts[2:]) / (times[-1] - times[1])


@torch.no_grad()
def alone(model, cache, question: list[int], new_tokens: int) -> tuple[list[int], float]:
    """One question appended to the document's cache and decoded as generate() does; the cache is then
    truncated back to the document."""
    device, length = model.tok_embeddings.weight.device, cache.length
    ids, times = [], []
    for token in decode(model, cache, prefill(model, cache, question), new_tokens):
        ids.append(token)
        times.append(perf_counter())
    sync(device)
    times[-1] = perf_counter()  # a GPU runs a step ahead of the host: the last step ends here
    cache.truncate(length)
    return ids, rate(times, [1] * len(times))


@torch.no_grad()
def together(model, cache, questions: list[list[int]], new_tokens: int, chunk: int) -> tuple[list[list[int]], float]:
    shared = SharedPrefixCache(cache, [len(q) for q in questions], new_tokens - 1)
    answers, times, counts = [[] for _ in questions], [], []
    for step in decode_many(model, shared, prefill_questions(model, shared, questions, chunk), new_tokens):
        for i, token in step:
            answers[i].append(token)
        times.append(perf_counter())  # decode_many reads each step's tokens on the host: the step is done
        counts.append(len(step))
    return answers, rate(times, counts)


def measure(model, plan, document: list[int], questions: list[list[int]], sizes, new_tokens: int, chunk: int,
            exact: bool, repeats: int = 1, step_bound_s=None) -> dict:
    cache = make_cache(plan, model.args)
    t0 = perf_counter()
    prefill(model, cache, document, chunk, progress=True)
    sync(model.tok_embeddings.weight.device)
    prefill_s = perf_counter() - t0
    print(f"document: {len(document)} tokens prefilled in {prefill_s:.1f} s ({plan.describe()})", flush=True)
    answers, rates = [], []
    for i, question in enumerate(questions):
        ids, tok_s = alone(model, cache, question, new_tokens)
        answers.append(ids)
        rates.append(tok_s)
        print(f"alone, question {i + 1}/{len(questions)}: {tok_s:.2f} tok/s", flush=True)
    one = statistics.median(rates)
    runs, agree = {B: [] for B in sizes}, {}
    for _ in range(repeats):  # interleaved, so that a slow spell of a shared machine hits every B alike
        for B in sizes:
            got, tok_s = together(model, cache, questions[:B], new_tokens, chunk)
            same = sum(a == b for a, b in zip(got, answers))
            if exact:
                assert same == B, f"B={B}: {B - same} answers differ from the question asked alone"
            runs[B].append(tok_s)
            agree[B] = min(agree.get(B, B), same)
            bound = f", PCIe bound {B / step_bound_s:.2f} tok/s" if step_bound_s else ""
            print(f"together, B={B}: {tok_s:.2f} tok/s over all questions, {tok_s / one:.2f}x one question alone; "
                  f"{same}/{B} answers equal alone{bound}", flush=True)
    rows = []
    for B, rates_B in runs.items():
        tok_s = statistics.median(rates_B)
        rows.append(dict(questions=B, decode_tok_s=tok_s, per_question_tok_s=tok_s / B, speedup=tok_s / one,
                         answers_equal_alone=agree[B], runs_tok_s=rates_B))
    return dict(document_tokens=len(document), question_tokens=[len(q) for q in questions], new_tokens=new_tokens,
                prefill_s=prefill_s, plan=plan.as_dict(), alone_tok_s=rates, alone_tok_s_median=one,
                answers=answers, together=rows)


def h2d_gbps(device) -> float:
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    return host.nbytes / best_time(device, lambda: gpu.copy_(host, non_blocking=True)) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="a tiny random model on the CPU (what CI runs)")
    p.add_argument("--context", default="128K", help="CUDA: tokens of the Llama-3-8B-shape document (default 128K)")
    p.add_argument("--new-tokens", type=int, default=None, help="per question (default 32 on CPU, 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each batch size, interleaved; the median is kept (default 3 on CPU, 1 on CUDA)")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file (default bench/results/many-questions-<device>.json)")
    opts = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not opts.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", **machine()}
    random_ids = lambda n, seed: torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    if opts.dry_run:
        model = build_model(DRY_ARGS, "cpu", torch.float32)
        new_tokens, questions = opts.new_tokens or 6, [random_ids(n, seed) for seed, n in enumerate((3, 9, 5, 1))]
        plan = plan_memory(model.args, 300 + 9 + new_tokens, torch.float32, "head", "cpu", group_size=1, resident=0)
        result["run"] = measure(model, plan, random_ids(300, 99), questions, (1, 2, 4), new_tokens, 64, True)
    elif cuda:
        args, context = ModelArgs.from_name("Llama-3.1-8B"), parse_tokens(opts.context)
        model = build_model(args, "cuda", torch.bfloat16)
        new_tokens, questions = opts.new_tokens or 8, [random_ids(20 + 3 * i, i) for i in range(16)]
        plan = plan_memory(args, context + 65 + new_tokens, torch.bfloat16, "head", "cuda", group_size=1,
                           resident=0)  # every head streamed; room for one question alone and its answer
        result["h2d_gbps"] = bandwidth = h2d_gbps(device)
        step_bound_s = plan.store_bytes / (bandwidth * 1e9)
        print(f"H2D {bandwidth:.1f} GB/s: streaming {plan.store_bytes / 2**30:.1f} GiB takes {step_bound_s:.3f} s "
              f"per step", flush=True)
        result["step_bound_s"] = step_bound_s
        result["run"] = measure(model, plan, random_ids(context, 99), questions, (1, 4, 16), new_tokens, 8192,
                                exact=False, repeats=opts.repeats or 1, step_bound_s=step_bound_s)
        result["run"]["context"] = fmt_tokens(context)
    else:  # the CLI's prompts: each question's templated prompt, the document being what they share
        model, tokenizer = load_model(None)
        document = DOCUMENT[:len(DOCUMENT) // 2]  # ~2K tokens
        prompts = [tokenizer.encode(prompt_text(tokenizer, True, q, opening=document)) for q in QUESTIONS]
        n, new_tokens = shared_length(prompts), opts.new_tokens or 32
        plan = plan_memory(model.args, max(map(len, prompts)) + new_tokens, torch.float32, "none", "cpu")
        result["run"] = measure(model, plan, prompts[0][:n], [ids[n:] for ids in prompts], (1, 2, 4, 8),
                                new_tokens, 512, exact=True, repeats=opts.repeats or 3)
    out = opts.out or ROOT / "bench" / "results" / f"many-questions-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'B':>3} {'tok/s':>8} {'x alone':>8}   (alone: {result['run']['alone_tok_s_median']:.2f} tok/s)")
    for row in result["run"]["together"]:
        print(f"{row['questions']:>3} {row['decode_tok_s']:>8.2f} {row['speedup']:>8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
