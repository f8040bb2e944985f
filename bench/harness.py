"""What every benchmark section shares: a random-weight model, named KV configs, fill_cache, timed runs.

Timed runs call the model and the caches directly (the loop generate.py runs), so that a section can
pick head groupings that generate() chooses by itself, and start decoding at a depth it never filled.
"""
import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

from generate import decode_step
from model import ModelArgs, Transformer, rope_inv_freq
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache
from planner import make_cache, plan_cache

K = 1024
# A tiny shape for --dry-run and tests: every code path, in seconds on a CPU.
DRY_ARGS = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128,
                     vocab_size=256, max_seq_len=4096)
WARMUP_STEPS = 2  # decode steps before timing: lazy kernel selection, allocator growth


class Clock:
    """Elapsed time against the run's budget; every progress line says how far in we are."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.reserve_s = 0.0  # kept back for sections still to come

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def log(self, msg: str):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def parse_tokens(text: str) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '4096' -> 4096."""
    text = text.strip().upper()
    scale = {"K": K, "M": K * K}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def fmt_tokens(n: int) -> str:
    return f"{n // (K * K)}M" if n % (K * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


def cpu_model() -> str:
    """The CPU's model name and the kernels torch picks on it (AVX2, AVX512, ...): rounding and speed
    differ with both."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        name = platform.processor() or "unknown"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def machine() -> dict:
    """What every result file records first: the CPU and its kernels, the threads, torch, and when (UTC)."""
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def parts_parser(doc: str, gpu_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark with a CPU part (the default) and a GPU part (--gpu); parse with parse_parts."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--gpu", action="store_true", help=gpu_help)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every path in seconds (CI)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repeats per configuration (default 3)")
    return p


def parse_parts(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    opts = p.parse_args(argv)
    if opts.gpu and not opts.dry_run and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA GPU; --dry-run runs its paths on the CPU")
    return opts


# --- model -----------------------------------------------------------------------------------------

def build_model(args: ModelArgs, device, dtype, seed: int = 0) -> Transformer:
    """Random weights made directly on the device: no fp32 copy, no checkpoint, no host round trip."""
    args = replace(args, max_seq_len=1 << 24)  # benchmarks go far past the trained context on purpose
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.ndim == 1:  # biases (Qwen2)
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(args).to(device)  # a non-persistent buffer, left empty by to_empty
    return model.eval().requires_grad_(False)


def weights_bytes(model) -> int:
    return sum(p.nbytes for p in model.parameters())


def meta_weights_bytes(args: ModelArgs, dtype) -> int:
    """Weight bytes without allocating them (the planner needs them before any model exists)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(args).parameters()) * dtype.itemsize


# --- KV configurations -----------------------------------------------------------------------------
# standard: offload=none, the prompt in one chunk | chunked/none: offload=none, chunked prefill
# layer: whole layers streamed | head: one KV head per streamed group, nothing resident (HeadInfer)
# head_budget: what generate.py picks by default (resident slots in free GPU memory, adaptive groups)

def make_kv(name: str, model, max_len: int):
    args, dev, dtype = model.args, model.inv_freq.device, model.tok_embeddings.weight.dtype
    if name in ("standard", "chunked", "none"):
        return StandardCache(args, 1, max_len, dev, dtype)
    if name == "layer":
        return LayerOffloadCache(args, 1, max_len, dev, dtype)
    if name == "head":
        return HeadOffloadCache(args, 1, max_len, dev, dtype, group_size=1, resident=0)
    if name == "head_budget":
        return make_cache(plan_cache(args, max_len, dtype, dev, "head"), args)
    raise ValueError(f"unknown KV config {name!r}")


def cache_layout(cache) -> dict:
    if isinstance(cache, HeadOffloadCache):
        return dict(group_size=cache.group_size, resident_heads=sum(cache.resident))
    return dict(group_size=None, resident_heads=cache.args.n_layer * cache.args.n_kv_head)  # all on the device


def longest_context(args: ModelArgs, dtype, host_budget: int, step: int) -> int:
    """The longest context (a multiple of `step`) whose all-offloaded store fits `host_budget`; stores
    are pinned at exactly their size (offload.pinned_empty), so that is the KV bytes per token."""
    return host_budget // (args.kv_bytes_per_token(dtype) * step) * step


# --- fill_cache ------------------------------------------------------------------------------------

def _tile(cache, layer: int, which: int, seed: int, block: int):
    """[B, n_kv, block, D] random values for one layer's K (which=0) or V (which=1), made on the compute
    device from a seed of (seed, layer, which): every policy gets the same values for the same slot."""
    a = cache.args
    g = torch.Generator(cache.device).manual_seed(seed * 1_000_003 + 2 * layer + which)
    x = torch.randn(cache.batch, a.n_kv_head, block, a.head_dim, generator=g, device=cache.device)
    return x.to(cache.dtype)


@torch.no_grad()
def fill_cache(cache, length: int, seed: int = 0, block: int = 1024, copy_tokens: int = 65536):
    """Write random K/V for positions [0, length) through the cache's public `write`, as if a prompt
    had been prefilled; every policy and grouping gets the same values.

    Position p holds row p % block of one random tile per layer: drawing 100 GB of random numbers (or
    writing them from the CPU) would take minutes. Each write covers up to copy_tokens positions of
    every layer, made on the compute device (D2H into pinned stores at DMA speed).
    """
    if not 0 <= length <= cache.max_len:
        raise ValueError(f"cannot fill {length} positions of a {cache.max_len}-token cache")
    tiles = [[_tile(cache, layer, which, seed, block) for which in (0, 1)] for layer in range(cache.args.n_layer)]
    reps = max(1, min(length, copy_tokens) // block)  # whole tiles per write, so the period stays `block`
    cache.truncate(0)
    for s in range(0, length, reps * block):
        n = min(reps * block, length - s)
        for layer, (k, v) in enumerate(tiles):  # every layer at s, so the length reaches s + n
            cache.write(layer, s, k.repeat(1, 1, reps, 1)[:, :, :n], v.repeat(1, 1, reps, 1)[:, :, :n])
    sync(cache.device)


# --- timing and memory -----------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: dict, reps: int) -> dict:
    """Each fn's median wall time over `reps` interleaved rounds (after one warm-up round)."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(device, fn):
    """(result, seconds) with the device drained on both sides: every stream's work is counted."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> dict:
    if device.type != "cuda":
        return dict(peak_gpu_bytes=None, peak_reserved_bytes=None)
    return dict(peak_gpu_bytes=torch.cuda.max_memory_allocated(device),
                peak_reserved_bytes=torch.cuda.max_memory_reserved(device))


def release(device):
    """Give back device memory and cached pinned blocks, so the next run starts from the same state
    (the pinned cache would otherwise keep 64 GiB of one layout while the next layout is allocated)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def attempt(device, fn) -> dict:
    """Run one measurement; an OOM or a refused plan becomes the row's `error`, never the run's end."""
    try:
        row = fn()
    except torch.OutOfMemoryError:
        row = {"error": "oom"}
    except (RuntimeError, ValueError) as e:  # pinned allocation failures, plan refusals, full caches
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = {"error": "oom" if "out of memory" in msg.lower() else msg[:300]}
    except Exception as e:  # UsageError (plan_cache) and anything unforeseen: recorded, not fatal
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    release(device)
    if "error" in row:
        print(f"    -> {row['error']}", file=sys.stderr, flush=True)
    return row


# --- the two measurements --------------------------------------------------------------------------

@torch.no_grad()
def prefill_run(model, cache, chunk: int, seed: int = 0) -> dict:
    """A real chunked prefill of cache.max_len random tokens (the loop generate() runs)."""
    dev, n = model.inv_freq.device, cache.max_len
    ids = torch.randint(0, model.args.vocab_size, (1, n), device=dev, generator=torch.Generator(dev).manual_seed(seed))
    reset_peak(dev)

    def run():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            model(ids[:, s:e], torch.arange(s, e, device=dev), cache, last_only=True)

    _, seconds = timed(dev, run)
    return dict(seconds=seconds, chunk=chunk, kv_gpu_bytes=cache.gpu_bytes, kv_cpu_bytes=cache.host_bytes,
                **cache_layout(cache), **peak(dev))


@torch.no_grad()
def context_run(model, cache, chunk: int, target_s: float, max_steps: int, seed: int = 0) -> dict:
    """Fill the cache, then one real prefill chunk and timed decode steps that end at max_len.

    Steps run until about target_s of decoding (at least 3, at most max_steps). The peak memory covers
    the chunk and the decode steps; the fill's temporaries are gone by then.
    """
    dev, L = model.inv_freq.device, cache.max_len
    max_steps = min(max_steps, L // 4)
    tail = WARMUP_STEPS + 1 + max_steps  # warm-up, one probe step, the timed steps
    chunk = min(chunk, L - tail)
    start = L - chunk - tail
    _, fill_s = timed(dev, lambda: fill_cache(cache, start, seed))
    reset_peak(dev)
    ids = torch.randint(0, model.args.vocab_size, (1, chunk), device=dev)
    logits, chunk_s = timed(dev, lambda: model(ids, torch.arange(start, start + chunk, device=dev), cache,
                                               last_only=True))
    token, pos = logits[:, -1].argmax(-1, keepdim=True), torch.tensor([start + chunk], device=dev)

    def steps(n):
        nonlocal token
        for _ in range(n):  # the next token stays on the device: no host sync inside the loop
            token = decode_step(model, token, pos, cache).argmax(-1, keepdim=True)
            pos.add_(1)

    steps(WARMUP_STEPS)
    _, probe = timed(dev, lambda: steps(1))
    n = min(max_steps, max(3, math.ceil(target_s / max(probe, 1e-6))))
    _, seconds = timed(dev, lambda: steps(n))
    # Bytes streamed per step: the CPU stores' share of the context at the middle of the timed steps.
    mid = start + chunk + WARMUP_STEPS + 1 + n / 2
    return dict(s_per_token=seconds / n, steps=n, chunk=chunk, chunk_s=chunk_s, fill_s=fill_s, decode_from=start + chunk,
                streamed_bytes_per_token=int(cache.store_bytes * mid / L), kv_gpu_bytes=cache.gpu_bytes,
                kv_cpu_bytes=cache.host_bytes, **cache_layout(cache), **peak(dev))
