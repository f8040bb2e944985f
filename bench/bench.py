"""Benchmarks that reproduce HeadInfer's tables (arXiv 2502.12574) for Llama-3-8B with random bf16 weights.

    python bench/bench.py                       # every section, sized to end within ~9 minutes on an H100
    python bench/bench.py --sections decode --contexts 32K,128K,max
    python bench/bench.py --dry-run --out /tmp/b # tiny model on the CPU: every code path, in seconds

Sections: ceilings (PCIe and SDPA), memory (Tables 10/11), max_context (Tables 3/5, 24 GiB cap),
prefill (Table 6), decode (Table 7), hf (transformers' offloaded cache as a peer). Results go to
OUT/summary.json, one JSON per section and PNG plots; a PASS/FAIL table of the targets ends the run.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root: model.py, offload.py, bench/

import torch
import torch.nn.functional as F

from attention import attention
from model import ModelArgs
from planner import DEFAULT_PREFILL_CHUNK, GiB, activation_reserve, host_available_bytes

from bench.harness import (DRY_ARGS, WARMUP_STEPS, K, Clock, attempt, build_model, context_run, fmt_tokens,
                           longest_context, make_kv, meta_weights_bytes, parse_tokens, prefill_run, release, timed)

SECTIONS = ("ceilings", "memory", "max_context", "prefill", "decode", "hf")
MAX_STEPS = 32       # decode steps timed at most per row (fewer at long contexts: about TARGET_S of decoding)
TARGET_S = 1.0
MAX_CONTEXT_S = 150  # kept back for the max_context section: 4 processes, two of them pinning ~64 GiB
HOST_MARGIN = 0.8    # of MemAvailable: the process itself, page cache and the OS need the rest
PIN_BPS = 4e9        # assumed pinning rate, for time estimates only
GEMM_FLOPS = 400e12  # assumed bf16 GEMM rate, for time estimates only
GPU_SCHEDULE = dict(memory=[32 * K, 128 * K, "max"], decode=[K, 4 * K, 16 * K, 32 * K, 128 * K, "max"],
                    prefill=[K, 4 * K, 16 * K, 32 * K, 64 * K, 128 * K], hf=[K, 4 * K, 16 * K, 32 * K])
DRY_SCHEDULE = dict(memory=[128, 256, "max"], decode=[64, 128, 256, "max"], prefill=[64, 128, 256, 512], hf=[64, 128])
# Target thresholds: "long" and "short" contexts, scaled down for the dry run's tiny shapes.
GPU_LIMITS, DRY_LIMITS = dict(long=128 * K, short=4 * K), dict(long=256, short=128)


class Run:
    """Everything the sections share: options, shapes, measured ceilings, memoized rows, the model."""

    def __init__(self, opts):
        self.opts, self.dry = opts, opts.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        if self.dry:  # tiny shapes gain nothing from threads; on a busy 2-core box they cost ms per matmul
            torch.set_num_threads(1)
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.args = DRY_ARGS if self.dry else ModelArgs.from_name(opts.model)
        self.chunk = 32 if self.dry else opts.prefill_chunk
        self.step = 16 if self.dry else K  # context granularity of the max-context search
        self.target_s = 0.0 if self.dry else TARGET_S  # dry run: the minimum of 3 timed steps
        self.clock = Clock(opts.time_budget)
        self.out = Path(opts.out)
        self.weights = meta_weights_bytes(self.args, self.dtype)
        kv_tok = self.args.kv_bytes_per_token(self.dtype)
        self.host_budget = 512 * kv_tok if self.dry else int(HOST_MARGIN * (host_available_bytes() or 0))
        # Dry run: a cap that leaves the tiny model 384 tokens of KV: head offload then runs into the host
        # budget (512 tokens) and layer offload into the cap, so both verdicts are exercised.
        self.cap = (self.weights + activation_reserve(self.args, self.dtype, self.chunk) + 384 * kv_tok if self.dry
                    else int(opts.cap_gib * GiB))
        self.longest = longest_context(self.args, self.dtype, self.host_budget, 64 if self.dry else 64 * K)
        self.limits = DRY_LIMITS if self.dry else GPU_LIMITS
        given = [c.strip() for c in opts.contexts.split(",")] if opts.contexts else None
        resolve = lambda c: self.longest if str(c) == "max" else parse_tokens(str(c))
        self.contexts = {sec: sorted({resolve(c) for c in given or sched} - {0})  # 0: host RAM unknown
                         for sec, sched in (DRY_SCHEDULE if self.dry else GPU_SCHEDULE).items()}
        self.memo, self.notes = {}, []
        self.h2d_gbps = self.d2h_gbps = self.sdpa_tflops = self.d2d_gbps = self.gemm_tflops = None
        self._model = None
        self.summary = dict(device=torch.cuda.get_device_name(self.device) if not self.dry else "cpu (dry run)",
                            torch=torch.__version__, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            dry_run=self.dry, model="tiny (dry run)" if self.dry else opts.model, dtype=str(self.dtype),
                            host_budget_bytes=self.host_budget,
                            longest_context=self.longest, prefill_chunk=self.chunk, weights_bytes=self.weights,
                            h2d_gbps=None, d2h_gbps=None, sdpa_tflops=None, d2d_gbps=None, gemm_tflops=None,
                            memory=[], decode=[], prefill=[], max_context_24gib={}, targets=[], notes=self.notes)

    @property
    def model(self):
        if self._model is None:
            self.clock.log(f"building the model with random weights on {self.device}")
            self._model = build_model(self.args, self.device, self.dtype)
        return self._model

    def drop_model(self):
        self._model = None
        release(self.device)

    def write(self, name=None, data=None):
        """Section JSON now, summary.json every time: a run killed late keeps what it measured."""
        self.out.mkdir(parents=True, exist_ok=True)
        if name is not None:
            (self.out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        self.summary["elapsed_s"] = round(self.clock.elapsed(), 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")


# --- 1. ceilings -----------------------------------------------------------------------------------

def best_time(device, fn, reps=5) -> float:
    """Best of `reps` after one warm-up; CUDA events time the device work alone."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            best = min(best, timed(device, fn)[1])
    return best


def section_ceilings(run):
    dev, a, out = run.device, run.args, {}
    if dev.type == "cuda":
        n = GiB
        host, gpu = torch.empty(n, dtype=torch.uint8, pin_memory=True), torch.empty(n, dtype=torch.uint8, device=dev)
        # Per copy size too: a decode step at short context streams many small copies.
        out["h2d_gbps_by_bytes"] = {str(s): s / best_time(dev, lambda: gpu[:s].copy_(host[:s], non_blocking=True)) / 1e9
                                    for s in (1 << 20, 1 << 24, 1 << 28, n)}
        out["h2d_gbps"] = out["h2d_gbps_by_bytes"][str(n)]
        out["d2h_gbps"] = n / best_time(dev, lambda: host.copy_(gpu, non_blocking=True)) / 1e9
        other = torch.empty_like(gpu)  # HBM: a device-to-device copy reads and writes every byte
        out["d2d_gbps"] = 2 * n / best_time(dev, lambda: other.copy_(gpu)) / 1e9
        del host, gpu, other
    else:  # dry run: a CPU memcpy stands in for the PCIe and HBM copies
        src = torch.empty(1 << 24, dtype=torch.uint8)
        dst = torch.empty_like(src)
        out["h2d_gbps"] = out["d2h_gbps"] = src.nbytes / best_time(dev, lambda: dst.copy_(src)) / 1e9
        out["d2d_gbps"] = 2 * out["h2d_gbps"]
    # The linear layers' rate, at a prefill chunk's shape through the MLP's up projection.
    x = torch.randn(run.chunk, a.dim, device=dev, dtype=run.dtype)
    w = torch.randn(a.intermediate_size, a.dim, device=dev, dtype=run.dtype)
    out["gemm_tflops"] = 2 * run.chunk * a.dim * a.intermediate_size / best_time(dev, lambda: F.linear(x, w)) / 1e12
    del x, w
    T, H, D = (32 * K, 32, 128) if dev.type == "cuda" else (512, 4, 16)
    q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=run.dtype) for _ in range(3))
    flops = 2 * 2 * T * T * H * D / 2  # QK^T and PV, half of the square under the causal mask
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.update(sdpa_shape=dict(T=T, H=H, D=D), sdpa_tflops=flops / best_time(dev, sdpa) / 1e12, sdpa_backends={})
    if dev.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    out["sdpa_backends"][name.lower()] = flops / best_time(dev, sdpa) / 1e12
            except (RuntimeError, AttributeError) as e:
                out["sdpa_backends"][name.lower()] = f"unavailable: {str(e)[:120]}"
    # The kernels chunked prefill runs: one chunk of queries at the end of T keys, bottom-right causal,
    # GQA; for all heads at once (standard cache) and for one KV head's group (head offload, group 1).
    Tc, rep = min(run.chunk, T // 4), a.n_head // a.n_kv_head
    out["chunk_attention_tflops"] = {}
    for label, hq, hk in (("all_heads", a.n_head, a.n_kv_head), ("one_kv_head", rep, 1)):
        qc = torch.randn(1, hq, Tc, a.head_dim, device=dev, dtype=run.dtype)
        kc, vc = (torch.randn(1, hk, T, a.head_dim, device=dev, dtype=run.dtype) for _ in range(2))
        f = 4 * hq * a.head_dim * Tc * (T - Tc / 2)
        out["chunk_attention_tflops"][label] = f / best_time(dev, lambda: attention(qc, kc, vc)) / 1e12
    del q, k, v, qc, kc, vc
    release(dev)
    run.h2d_gbps, run.d2h_gbps, run.sdpa_tflops = out["h2d_gbps"], out["d2h_gbps"], out["sdpa_tflops"]
    run.d2d_gbps, run.gemm_tflops = out["d2d_gbps"], out["gemm_tflops"]
    run.summary.update(h2d_gbps=run.h2d_gbps, d2h_gbps=run.d2h_gbps, sdpa_tflops=run.sdpa_tflops,
                       d2d_gbps=run.d2d_gbps, gemm_tflops=run.gemm_tflops)
    run.clock.log(f"ceilings: H2D {run.h2d_gbps:.1f} GB/s, D2H {run.d2h_gbps:.1f} GB/s, HBM {run.d2d_gbps:.0f} GB/s, "
                  f"SDPA {run.sdpa_tflops:.1f} TFLOP/s, GEMM {run.gemm_tflops:.1f} TFLOP/s")
    run.write("ceilings", out)


# --- measurements shared by memory, decode and prefill ---------------------------------------------

def attention_flops(a: ModelArgs, T: int, S: int) -> float:
    """Causal attention FLOPs of T queries that end a context of S keys (all layers)."""
    return 4 * a.n_layer * a.n_head * a.head_dim * T * (S - T / 2)


def linear_flops(a: ModelArgs, T: int) -> float:
    """FLOPs of the linear layers (projections and MLP, all layers; the output layer runs on the last
    position only) for T tokens."""
    per_layer = (a.dim * (a.n_head + 2 * a.n_kv_head) * a.head_dim + a.n_head * a.head_dim * a.dim
                 + 3 * a.dim * a.intermediate_size)
    return 2 * a.n_layer * per_layer * T


def roofline_s(run, L: int) -> float | None:
    """A prefill of L tokens at the measured ceilings: attention at the SDPA rate, linears at the GEMM rate."""
    if not run.sdpa_tflops or not run.gemm_tflops:
        return None
    return (attention_flops(run.args, L, L) / (run.sdpa_tflops * 1e12)
            + linear_flops(run.args, L) / (run.gemm_tflops * 1e12))


def estimate(run, kind, cfg, L) -> float:
    """Rough seconds for one row (performance model; assumed rates until the ceilings are measured)."""
    kv = L * run.args.kv_bytes_per_token(run.dtype)
    streamed = kv if cfg in ("layer", "head") else 0
    sdpa = 0.5 * (run.sdpa_tflops or 300) * 1e12
    h2d = (run.h2d_gbps or 25) * 1e9
    if kind == "prefill":
        return streamed / PIN_BPS + attention_flops(run.args, L, L) / sdpa + run.weights / run.dtype.itemsize * 2 * L / GEMM_FLOPS
    step = streamed / h2d + 0.05
    steps = WARMUP_STEPS + 1 + min(MAX_STEPS, max(3, TARGET_S / step))
    return streamed / PIN_BPS + kv / h2d + attention_flops(run.args, min(run.chunk, L), L) / sdpa + steps * step


def measure(run, kind, cfg, L) -> dict:
    """One row's raw numbers, measured once per (kind, config, context) and shared between sections."""
    key = (kind, cfg, L)
    if key in run.memo:
        return run.memo[key]
    if cfg in ("standard", "chunked", "none") and run.device.type == "cuda":  # all KV on the device: fits?
        need = (L * run.args.kv_bytes_per_token(run.dtype) + run.weights
                + activation_reserve(run.args, run.dtype, L if cfg == "standard" else run.chunk))
        total = torch.cuda.get_device_properties(run.device).total_memory
        if need > total:  # an attempt would end in an OOM too, after minutes of prefill for `standard`
            run.memo[key] = {"error": f"oom (predicted: needs {need / GiB:.0f} GiB of {total / GiB:.0f} GiB)"}
            return run.memo[key]
    est = estimate(run, kind, cfg, L)
    if not run.clock.allows(est):
        run.notes.append(f"skipped {kind} {cfg} at {fmt_tokens(L)}: needs about {est:.0f} s, {run.clock.left():.0f} s left")
        run.memo[key] = {"error": "skipped: time budget"}
        return run.memo[key]
    run.clock.log(f"{kind} {cfg} at {fmt_tokens(L)} (estimate {est:.0f} s)")
    model = run.model

    def go():
        results = []
        for _ in range(2 if kind == "prefill" and L <= run.chunk else 1):  # short prefills: keep the warm one
            t0 = time.perf_counter()
            cache = make_kv(cfg, model, L)
            alloc_s = time.perf_counter() - t0
            if kind == "prefill":
                r = prefill_run(model, cache, L if cfg == "standard" else run.chunk)
            else:
                r = context_run(model, cache, run.chunk, run.target_s, MAX_STEPS)
            del cache
            results.append(dict(alloc_s=alloc_s, **r))
        return min(results, key=lambda r: r.get("seconds", 0))

    run.memo[key] = attempt(run.device, go)
    return run.memo[key]


def pick(r, *keys):
    return {k: r[k] for k in keys if k in r}


# --- 2 and 5. memory and decode: fill, one real chunk, timed decode steps --------------------------

MEMORY_POLICIES = {"standard": ("prefill", "standard"), "chunked": ("decode", "none"),
                   "layer": ("decode", "layer"), "head": ("decode", "head")}
DECODE_CONFIGS = ("none", "head", "head_budget", "layer")  # per context, the targets' rows first


def section_memory_decode(run, sections):
    points = set()
    if "decode" in sections:
        points |= {(cfg, L) for cfg in DECODE_CONFIGS for L in run.contexts["decode"]}
    if "memory" in sections:
        points |= {(cfg, L) for kind, cfg in MEMORY_POLICIES.values() if kind == "decode" for L in run.contexts["memory"]}
    for cfg, L in sorted(points, key=lambda p: (p[1], DECODE_CONFIGS.index(p[0]))):
        measure(run, "decode", cfg, L)

    if "memory" in sections:
        run.summary["memory"] = [memory_row(run, policy, L)
                                 for L in run.contexts["memory"] for policy in MEMORY_POLICIES]
        run.write("memory", run.summary["memory"])
    if "decode" in sections:
        run.summary["decode"] = [decode_row(run, cfg, L) for L in run.contexts["decode"] for cfg in DECODE_CONFIGS]
        run.write("decode", run.summary["decode"])


def memory_row(run, policy: str, L: int) -> dict:
    kind, cfg = MEMORY_POLICIES[policy]
    r = measure(run, kind, cfg, L)
    pk, kv = r.get("peak_gpu_bytes"), r.get("kv_gpu_bytes")
    beyond = None if pk is None else pk - run.weights
    return dict(policy=policy, context=L, peak_gpu_bytes=pk, gpu_bytes_beyond_weights=beyond, weights_bytes=run.weights,
                kv_gpu_bytes=kv, activation_bytes=None if pk is None else beyond - kv,
                **pick(r, "chunk", "group_size", "resident_heads", "kv_cpu_bytes", "peak_reserved_bytes", "error"))


def decode_row(run, cfg: str, L: int) -> dict:
    """pcie_util: the streamed bytes at the measured H2D rate over the step time; hbm_util: the weights
    and the whole KV read once at the measured HBM rate over the step time (the on-GPU bound)."""
    r = measure(run, "decode", cfg, L)
    s, streamed = r.get("s_per_token"), r.get("streamed_bytes_per_token")
    pcie = streamed / (run.h2d_gbps * 1e9) / s if s and streamed and run.h2d_gbps else None
    hbm_bytes = run.weights + L * run.args.kv_bytes_per_token(run.dtype)
    hbm = hbm_bytes / (run.d2d_gbps * 1e9) / s if s and run.d2d_gbps else None
    return dict(policy="head" if cfg == "head_budget" else cfg, config=cfg, context=L,
                resident_heads=r.get("resident_heads"), s_per_token=s, pcie_util=pcie, hbm_util=hbm,
                **pick(r, "group_size", "steps", "decode_from", "streamed_bytes_per_token", "chunk_s", "fill_s",
                       "alloc_s", "error"))


# --- 4. prefill ------------------------------------------------------------------------------------

PREFILL_CONFIGS = ("standard", "head", "layer", "chunked")  # the targets' rows first: a short budget cuts the rest


def section_prefill(run):
    run.summary["prefill"] = [prefill_row(run, cfg, L) for cfg in PREFILL_CONFIGS for L in run.contexts["prefill"]]
    run.write("prefill", run.summary["prefill"])


def prefill_row(run, cfg: str, L: int) -> dict:
    """tflops: attention FLOPs over the whole time; roofline_fraction: the time at the measured ceilings
    (roofline_s) over the time taken."""
    r = measure(run, "prefill", cfg, L)
    s, roof = r.get("seconds"), roofline_s(run, L)
    tflops = attention_flops(run.args, L, L) / s / 1e12 if s else None
    return dict(policy=cfg, context=L, seconds=s, tflops=tflops, tokens_per_s=L / s if s else None,
                sdpa_fraction=tflops / run.sdpa_tflops if tflops and run.sdpa_tflops else None,
                roofline_s=roof, roofline_fraction=roof / s if roof and s else None,
                **pick(r, "chunk", "group_size", "resident_heads", "peak_gpu_bytes", "alloc_s", "error"))


# --- 6. the transformers peer ----------------------------------------------------------------------

def section_hf(run):
    from bench.hf_peer import hf_decode_rows  # transformers is imported there, and only for this section
    run.drop_model()  # room for the peer's own copy of the weights
    rows = hf_decode_rows(run.args, run.device, run.dtype, run.contexts["hf"], run.clock, run.h2d_gbps,
                          run.target_s, MAX_STEPS, estimate=lambda L: estimate(run, "decode", "layer", L) * 2)
    run.summary["decode"] += rows
    run.write("hf", rows)


# --- 3. max context under a 24 GiB cap -------------------------------------------------------------

def section_max_context(run):
    from bench.max_context import max_contexts
    run.drop_model()  # the verifying processes need the GPU and host RAM this process holds
    res = max_contexts(run.args, run.dtype, run.cap, run.weights, run.host_budget, run.chunk, run.step,
                       run.opts.model, run.dry, run.clock)
    run.summary["max_context_24gib"] = {p: r["tokens"] for p, r in res.items()}
    run.summary["max_context_limited_by"] = {p: r["limited_by"] for p, r in res.items()}
    run.write("max_context", dict(cap_bytes=run.cap, host_budget_bytes=run.host_budget, policies=res))


# --- targets and the closing table -----------------------------------------------------------------

def targets(run) -> list[dict]:
    s, lim, slots = run.summary, run.limits, run.args.n_layer * run.args.n_kv_head
    dec = [r for r in s["decode"] if r.get("s_per_token")]
    pre = {(r["policy"], r["context"]): r for r in s["prefill"] if r.get("seconds")}
    out = []

    def check(name, pairs, ok, show):
        """pairs: the rows the target is about; PASS when ok() holds for all, n/a when there are none."""
        status = "n/a" if not pairs else "PASS" if all(ok(p) for p in pairs) else "FAIL"
        out.append(dict(target=name, status=status, detail="; ".join(show(p) for p in pairs)[:400]))

    streamed = [r for r in dec if r["config"] == "head" and r["context"] >= lim["long"] and r.get("pcie_util")]
    check(f"decode all-offloaded >= {fmt_tokens(lim['long'])}: PCIe util >= 0.90", streamed,
          lambda r: r["pcie_util"] >= 0.9, lambda r: f"{fmt_tokens(r['context'])} {r['pcie_util']:.2f}")
    none = {r["context"]: r for r in dec if r["config"] == "none"}
    pairs = [(r, none[r["context"]]) for r in dec if r["config"] == "head_budget" and r["resident_heads"] == slots
             and r["context"] <= lim["short"] and r["context"] in none]
    check(f"decode <= {fmt_tokens(lim['short'])}, all resident: head within 10% of standard", pairs,
          lambda p: p[0]["s_per_token"] <= 1.1 * p[1]["s_per_token"],
          lambda p: f"{fmt_tokens(p[0]['context'])} {p[0]['s_per_token'] / p[1]['s_per_token']:.2f}x")
    pairs = [(r, pre[("standard", L)]) for (c, L), r in pre.items() if c == "head" and ("standard", L) in pre]
    check("prefill: head within 10% of standard where standard fits", pairs,
          lambda p: p[0]["seconds"] <= 1.1 * p[1]["seconds"],
          lambda p: f"{fmt_tokens(p[0]['context'])} {p[0]['seconds'] / p[1]['seconds']:.2f}x")
    long_pre = [r for (c, L), r in pre.items() if c == "head" and L >= lim["long"] and r.get("roofline_fraction")]
    check(f"prefill >= {fmt_tokens(lim['long'])}: head >= 0.80 of the roofline (SDPA + GEMM ceilings)", long_pre,
          lambda r: r["roofline_fraction"] >= 0.8, lambda r: f"{fmt_tokens(r['context'])} {r['roofline_fraction']:.2f}")
    short = [r for r in dec if r["config"] == "none" and r["context"] <= lim["short"] and r.get("hbm_util")]
    check(f"decode <= {fmt_tokens(lim['short'])}: standard cache >= 0.60 of the HBM bound", short,
          lambda r: r["hbm_util"] >= 0.6, lambda r: f"{fmt_tokens(r['context'])} {r['hbm_util']:.2f}")
    mem = [r for r in s["memory"] if r["policy"] == "head" and r["context"] == run.longest
           and r.get("gpu_bytes_beyond_weights") is not None]
    check(f"memory at {fmt_tokens(run.longest)}: head beyond weights <= 1.5 GiB", mem,
          lambda r: r["gpu_bytes_beyond_weights"] <= 1.5 * GiB,
          lambda r: f"{r['gpu_bytes_beyond_weights'] / GiB:.2f} GiB")
    head0 = {r["context"]: r for r in dec if r["config"] == "head"}
    pairs = [(head0[r["context"]], r) for r in dec if r["policy"] == "hf_offloaded" and r["context"] in head0]
    check("decode: head (nothing resident) faster than hf_offloaded at every common length", pairs,
          lambda p: p[0]["s_per_token"] < p[1]["s_per_token"],
          lambda p: f"{fmt_tokens(p[0]['context'])} {p[1]['s_per_token'] / p[0]['s_per_token']:.2f}x faster")
    mc = [p for p in ("head",) if s["max_context_24gib"].get(p)]
    check("max context under the GPU cap: head limited by host RAM, not GPU", mc,
          lambda p: s["max_context_limited_by"][p] == "host",
          lambda p: f"{fmt_tokens(s['max_context_24gib'][p])} tokens, limited by {s['max_context_limited_by'][p]}")
    return out


def print_tables(run):
    s = run.summary

    def pivot(title, rows, label, show):
        ctxs = sorted({r["context"] for r in rows})
        if not ctxs:
            return
        print(f"\n{title:<22}" + "".join(f"{fmt_tokens(c):>9}" for c in ctxs))
        for lab in dict.fromkeys(label(r) for r in rows):
            cells = {r["context"]: r for r in rows if label(r) == lab}
            print(f"{lab:<22}" + "".join(f"{show(cells[c]) if c in cells else '':>9}" for c in ctxs))

    def cell(key, fmt, scale=1):
        def show(r):
            if r.get(key) is not None:
                return format(r[key] / scale, fmt)
            e = str(r.get("error") or "")
            return "oom" if e.startswith("oom") else "skip" if e.startswith("skipped") else "err" if e else "-"
        return show

    config = lambda r: r.get("config", r["policy"])
    pivot("decode s/token", s["decode"], config, cell("s_per_token", ".4f"))
    pivot("decode PCIe util", [r for r in s["decode"] if r.get("pcie_util")], config, cell("pcie_util", ".2f"))
    pivot("prefill s", s["prefill"], lambda r: r["policy"], cell("seconds", ".3f"))
    pivot("prefill / roofline", s["prefill"], lambda r: r["policy"], cell("roofline_fraction", ".2f"))
    pivot("decode HBM util", [r for r in s["decode"] if r.get("hbm_util")], config, cell("hbm_util", ".2f"))
    pivot("GiB beyond weights", s["memory"], lambda r: r["policy"], cell("gpu_bytes_beyond_weights", ".2f", GiB))
    if s["max_context_24gib"]:
        print("\nmax context under the cap: " + ", ".join(
            f"{p} {fmt_tokens(n) if n else '-'} ({s['max_context_limited_by'].get(p)})" for p, n in s["max_context_24gib"].items()))
    num = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"\nceilings: H2D {num(s['h2d_gbps'])} GB/s, D2H {num(s['d2h_gbps'])} GB/s, "
          f"SDPA {num(s['sdpa_tflops'])} TFLOP/s   ({s['device']}, torch {s['torch']})")
    print("\ntargets:" + ("  (dry run: tiny model on the CPU; the verdicts only exercise the checks)" if run.dry else ""))
    for t in s["targets"]:
        print(f"  {t['status']:<5} {t['target']}" + (f"  [{t['detail']}]" if t["detail"] else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--contexts", default=None,
                   help="comma list (e.g. 1K,32K,128K,max) replacing every section's contexts; max = longest host RAM allows")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--dry-run", action="store_true", help="tiny model, float32, CPU: every code path in seconds (CI)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="rows that would end past it are skipped (default 540, dry run 60)")
    p.add_argument("--model", default="Meta-Llama-3-8B", help="a name known to model.ModelArgs.from_name")
    p.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory cap of the max_context section")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="tokens per prefill chunk (generate.py's default; 32 in the dry run)")
    opts = p.parse_args(argv)
    opts.time_budget = opts.time_budget or (60.0 if opts.dry_run else 540.0)
    unknown = set(opts.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if not opts.dry_run and not torch.cuda.is_available():
        sys.exit("error: the benchmarks need a CUDA GPU; --dry-run runs every code path on the CPU")
    sections = set(opts.sections.split(","))
    run = Run(opts)
    if "max_context" in sections and not run.dry:  # it runs last; the rows before it must leave it time
        run.clock.reserve_s = min(MAX_CONTEXT_S, opts.time_budget / 3)
    run.clock.log(f"{run.summary['device']}, torch {torch.__version__}, {run.summary['model']}; longest context "
                  f"{fmt_tokens(run.longest)} (host budget {run.host_budget / GiB:.1f} GiB); sections {opts.sections}")
    if sections & {"ceilings", "decode", "prefill", "hf"}:  # their denominators: PCIe and SDPA ceilings
        section_ceilings(run)
    if sections & {"memory", "decode"}:
        section_memory_decode(run, sections)
    if "prefill" in sections:
        section_prefill(run)
    if "hf" in sections:
        section_hf(run)
    if "max_context" in sections:
        run.clock.reserve_s = 0.0
        section_max_context(run)
    run.summary["targets"] = targets(run)
    run.write()
    try:
        from bench.plot import make_plots
        make_plots(run.summary, run.out)
    except ImportError as e:
        print(f"warning: no plots ({e})", file=sys.stderr)
    print_tables(run)
    run.clock.log(f"done; results in {run.out}")


if __name__ == "__main__":
    main()
