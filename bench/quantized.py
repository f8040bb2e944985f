"""int8 and int4 weights (quantize.py): their bytes, speed and quality against the model dtype's weights.

    python bench/quantized.py --out bench/results/quantized-cpu.json     # CPU: the embedded model
    python bench/quantized.py --gpu --out gpu.json                        # GPU: Llama-3-8B and -70B shapes
    python bench/quantized.py --dry-run --out /tmp/q.json                 # every path, tiny shapes (CI)

CPU part (the embedded SmolLM2-135M-Instruct, whose GGUF holds Q4_1 linears and a Q8_0 embedding), for
fp32 and bf16 activations each with float, int8 and int4 weights, in one run:
- bytes: the weights on the device, and the embedding's share (it stays in the model dtype);
- speed: prefill tok/s over bench/execmodel.txt (2.3K tokens: the chapter "Execution model" of the
  Python Language Reference, (c) Python Software Foundation, PSF License) in chunks of 512, decode
  tok/s at that context, eager and compiled (medians of interleaved repeats);
- quality against fp32 float weights over the same text: top-1 agreement and mean KL(fp32 || this) of
  the next-token distribution at every position; also int8 with the output layer quantized too, which
  is what keeping it in the model dtype avoids; greedy answers to a few questions.
GPU part (random weights): Llama-3-8B shape, decode tok/s at 1K tokens with bf16, int8 and int4 weights
(eager and compiled); the planner under a 24 GiB cap at 128K tokens (the paper's RTX 4090): resident
fraction and s/token with bf16 and int8 weights; Llama-3-70B shape in int8 on one GPU with head offload
at 32K: does it load and decode, and its GPU memory beyond the weights.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import torch

import quantize as Q
from bench.harness import (DRY_ARGS, K, build_model, context_run, machine, median_times, parse_parts, parts_parser,
                           release, timed)
from generate import decode, generate, load_model, prefill
from model import ModelArgs, Transformer, rope_inv_freq
from offload import StandardCache
from planner import GiB, activation_reserve, make_cache, plan_cache, plan_memory

CONFIGS = [(dtype, weights) for dtype in ("float32", "bfloat16") for weights in (None, "int8", "int4")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUESTIONS = ["What is the capital of France?", "What is 12 times 12?", "Name the three primary colors.",
             "Who wrote Romeo and Juliet?"]
CHUNK = 512


def quantize_in_place(model, mode: str, head: bool = False):
    """Quantize a loaded (or random) model's linear layers where it lies, and the output layer too when
    `head` (a tied model gets an output layer of its own, the embedding quantized)."""
    device, dtype = model.inv_freq.device, model.tok_embeddings.weight.dtype
    for name in Q.quantized_layers(model) + (["output"] if head and model.output is not None else []):
        layer = model.get_submodule(name)
        model.set_submodule(name, Q.quantized_linear(mode, Q.quantize(layer.weight, mode), layer.bias, device, dtype))
    if head and model.output is None:
        model.output = Q.quantized_linear(mode, Q.quantize(model.tok_embeddings.weight, mode), None, device, dtype)
    return model


# --- CPU: the embedded model ---------------------------------------------------------------------

@torch.no_grad()
def all_logits(model, ids: list[int]) -> torch.Tensor:
    """Every position's next-token log-probabilities [T, vocab] in fp32, prefilled in chunks."""
    cache = StandardCache(model.args, 1, len(ids), "cpu", model.tok_embeddings.weight.dtype)
    out = [model(torch.tensor([ids[s:s + CHUNK]]), torch.arange(s, min(s + CHUNK, len(ids))), cache)[0]
           for s in range(0, len(ids), CHUNK)]
    return torch.cat(out).float().log_softmax(-1)


def quality(reference: torch.Tensor, logprobs: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - logprobs)).sum(-1)
    return dict(top1_agreement=(reference.argmax(-1) == logprobs.argmax(-1)).float().mean().item(),
                mean_kl=kl.mean().item(), max_kl=kl.max().item())


@torch.no_grad()
def speed(model, ids: list[int], new_tokens: int, reps: int, compile: bool) -> dict:
    """Prefill tok/s of `ids` in chunks, and decode tok/s after them (eager; compiled when asked)."""
    dtype = model.tok_embeddings.weight.dtype
    cache = StandardCache(model.args, 1, len(ids) + new_tokens + 1, "cpu", dtype)
    state = {}

    def prefill_all():
        cache.truncate(0)
        state["logits"] = prefill(model, cache, ids, CHUNK)

    def decode_with(compiled):
        def run():
            cache.truncate(len(ids))
            for _ in decode(model, cache, state["logits"], new_tokens, compile=compiled):
                pass
        return run

    prefill_all()
    fns = {"prefill": prefill_all, "decode": decode_with(False)} | ({"decode_compiled": decode_with(True)}
                                                                      if compile else {})
    times = median_times(fns, reps)
    return {"prefill_tok_s": len(ids) / times["prefill"], "decode_tok_s": new_tokens / times["decode"],
            "decode_compiled_tok_s": new_tokens / times["decode_compiled"] if compile else None}


def cpu_rows(dry: bool, reps: int, new_tokens: int, compile: bool) -> dict:
    if dry:  # a random tiny model, quantized where it lies; random tokens for text
        ids = torch.randint(0, DRY_ARGS.vocab_size, (600,), generator=torch.Generator().manual_seed(0)).tolist()
        tokenizer = None
        load = lambda dtype, weights, head=False: (quantize_in_place(build_model(DRY_ARGS, "cpu", dtype), weights, head)
                                                   if weights else build_model(DRY_ARGS, "cpu", dtype))
    else:
        tokenizer = load_model(None)[1]
        ids = tokenizer.encode((ROOT / "bench" / "execmodel.txt").read_text())
        load = lambda dtype, weights, head=False: (quantize_in_place(load_model(None, dtype=dtype)[0], weights, head)
                                                   if head else load_model(None, dtype=dtype, weights=weights)[0])
    reference = all_logits(load(torch.float32, None), ids)
    rows = []
    for dtype_name, weights in CONFIGS + [("float32", "int8 with the output layer")]:
        dtype, head = DTYPES[dtype_name], weights == "int8 with the output layer"
        model = load(dtype, "int8" if head else weights, head)
        described = Q.describe(model)
        row = dict(dtype=dtype_name, weights=weights or dtype_name, weights_bytes=described["weights_bytes"],
                   embedding_bytes=model.tok_embeddings.weight.nbytes, **quality(reference, all_logits(model, ids)))
        if not head:
            row |= speed(model, ids, new_tokens, reps, compile)
            if tokenizer is not None:
                row["answers"] = {q: tokenizer.decode(generate(model, tokenizer.encode(tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}])), 40, stop_ids=tokenizer.stop_ids)) for q in QUESTIONS}
        rows.append(row)
        print(f"{dtype_name:<9} {row['weights']:<27} {row['weights_bytes'] / 2**20:7.1f} MiB  top-1 "
              f"{row['top1_agreement']:.4f}  KL {row['mean_kl']:.5f}" + (
                  f"  prefill {row['prefill_tok_s']:6.0f} tok/s  decode {row['decode_tok_s']:5.1f} tok/s"
                  + (f" (compiled {row['decode_compiled_tok_s']:5.1f})" if compile else "") if not head else ""),
              flush=True)
    return dict(context=len(ids), chunk=CHUNK, new_tokens=new_tokens, reps=reps, rows=rows)


# --- GPU: Llama-3-8B and -70B shapes ---------------------------------------------------------------

def random_int8_model(args: ModelArgs, device, dtype) -> Transformer:
    """A model whose linears are int8 from the start: a 70B model's bf16 weights (141 GB) fit no GPU."""
    args = replace(args, max_seq_len=1 << 24)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        for name in Q.quantized_layers(model):
            out, n_in = model.get_submodule(name).weight.shape
            model.set_submodule(name, Q.Int8Linear(torch.empty(out, n_in, dtype=torch.int8), torch.empty(out, dtype=dtype),
                                                   None))
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == torch.int8:
                t.random_(-127, 128)
            elif name.endswith("scales"):
                t.fill_(0.02 / 73)  # uniform int8 has a std of 73: weights of std 0.02, as build_model's
            elif "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def decode_speed(model, context: int, steps: int, compile: bool) -> float:
    """Decode tok/s with the standard cache after `context` tokens."""
    dev, dtype = model.inv_freq.device, model.tok_embeddings.weight.dtype
    cache = StandardCache(model.args, 1, context + steps + 8, dev, dtype)
    logits = prefill(model, cache, list(range(context)), 4096)
    run = lambda n: [None for _ in decode(model, cache, logits, n, compile=compile)]
    run(4)  # warm-up (and compilation)
    cache.truncate(context)
    return steps / timed(dev, lambda: run(steps))[1]


def capped_plan(model, context: int, cap: int):
    """The planner's head-offload plan when the GPU has `cap` bytes: what the weights and one prefill chunk's
    activations leave is the KV budget (planner.plan_cache does the same with the measured free memory)."""
    dtype = model.tok_embeddings.weight.dtype
    free = cap - Q.describe(model)["weights_bytes"] - activation_reserve(model.args, dtype, 4096)
    return plan_memory(model.args, context, dtype, "head", model.inv_freq.device, gpu_budget=max(0, free),
                       prefill_chunk=4096)


def gpu_rows(dry: bool, compile: bool) -> dict:
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    args8 = DRY_ARGS if dry else ModelArgs.from_name("Meta-Llama-3-8B")
    short, long, cap = (256, 1024, None) if dry else (K, 128 * K, 24 * GiB)
    if dry:  # a cap under which float weights keep about half the KV resident, as 24 GiB does for 8B at 128K
        with torch.device("meta"):
            floats = Q.weight_bytes(Transformer(args8), None, dtype)
        cap = floats + activation_reserve(args8, dtype, 4096) + args8.kv_bytes_per_token(dtype) * long // 2
    out = {"decode_1k": [], "capped_128k": []}
    for weights in (None, "int8", "int4"):
        if weights == "int4" and dry:
            continue  # the CPU has no fp32 int4 kernel to time here; the dry run covers int8's path
        model = build_model(args8, device, dtype)
        model = quantize_in_place(model, weights) if weights else model
        row = dict(weights=weights or str(dtype).removeprefix("torch."), weights_bytes=Q.describe(model)["weights_bytes"],
                   decode_tok_s=decode_speed(model, short, 32, False),
                   decode_compiled_tok_s=decode_speed(model, short, 32, True) if compile else None)
        out["decode_1k"].append(row)
        print(f"decode at {short}: {row['weights']:<8} {row['decode_tok_s']:7.1f} tok/s"
              + (f", compiled {row['decode_compiled_tok_s']:7.1f}" if compile else ""), flush=True)
        if weights != "int4":
            plan = capped_plan(model, long, cap)
            cache = make_cache(plan, model.args)
            run = context_run(model, cache, 4096, target_s=5 if not dry else 0.1, max_steps=16)
            row = dict(weights=row["weights"], cap_bytes=cap, context=long, resident_slots=plan.resident_slots,
                       total_slots=plan.total_slots, resident_fraction=plan.resident_slots / plan.total_slots,
                       streamed_bytes=plan.store_bytes, s_per_token=run["s_per_token"])
            out["capped_128k"].append(row)
            print(f"{long} tokens under a {cap / GiB:.3g} GiB cap: {row['weights']:<8} resident "
                  f"{row['resident_fraction']:.2f}, {row['s_per_token']:.3f} s/token", flush=True)
            del cache
        del model
        release(device)
    args70 = replace(DRY_ARGS, n_layer=4) if dry else ModelArgs.from_name("Meta-Llama-3-70B")
    context = 512 if dry else 32 * K
    model = random_int8_model(args70, device, dtype)
    weights_bytes = Q.describe(model)["weights_bytes"]
    plan = plan_cache(model.args, context, dtype, device, "head", prefill_chunk=128 if dry else 4096)
    cache = make_cache(plan, model.args)
    run = context_run(model, cache, 4096 if not dry else 128, target_s=5 if not dry else 0.1, max_steps=8)
    beyond = run["peak_gpu_bytes"] - weights_bytes if run["peak_gpu_bytes"] is not None else None
    out["70b_int8"] = dict(shape="DRY" if dry else "Meta-Llama-3-70B", context=context, weights_bytes=weights_bytes,
                           resident_slots=plan.resident_slots, total_slots=plan.total_slots,
                           s_per_token=run["s_per_token"], peak_gpu_bytes=run["peak_gpu_bytes"],
                           gpu_bytes_beyond_weights=beyond)
    print(f"70B shape in int8: {weights_bytes / GiB:.1f} GiB of weights, {context} tokens, "
          f"{run['s_per_token']:.3f} s/token", flush=True)
    out["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    return out


def parse_args(argv=None):
    p = parts_parser(__doc__, "the GPU part (Llama-3-8B and -70B shapes, random weights)")
    p.add_argument("--new-tokens", type=int, default=48, help="decoded tokens per repeat (default 48)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decode (minutes on a CPU)")
    return parse_parts(p, argv)


def main(argv=None):
    opts = parse_args(argv)
    out = machine()
    compile = not opts.no_compile and not opts.dry_run
    if opts.gpu or opts.dry_run:
        out["gpu"] = gpu_rows(opts.dry_run, compile)
        Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    if not opts.gpu:
        out["embedded"] = cpu_rows(opts.dry_run, 1 if opts.dry_run else opts.reps, 8 if opts.dry_run else opts.new_tokens,
                              compile)
    Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
