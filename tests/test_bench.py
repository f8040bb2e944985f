"""The benchmark suite: its dry run (every code path, tiny model, CPU) and the fill_cache it relies on."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.harness import DRY_ARGS, build_model, fill_cache
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # A generous budget: on a slow CI box rows must not be skipped (the timeout still bounds the run).
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--dry-run", "--out", str(out),
                        "--time-budget", "600"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, p.stdout


def test_dry_run_summary_schema(dry_run):
    out, _ = dry_run
    s = json.loads((out / "summary.json").read_text())
    for key in ("device", "torch", "date", "h2d_gbps", "d2h_gbps", "sdpa_tflops", "decode", "prefill", "memory",
                "max_context_24gib", "targets"):
        assert key in s, key
    assert s["h2d_gbps"] > 0 and s["d2h_gbps"] > 0 and s["sdpa_tflops"] > 0
    fields = dict(decode={"policy", "context", "resident_heads", "s_per_token", "pcie_util"},
                  prefill={"policy", "context", "seconds", "tflops"},
                  memory={"policy", "context", "peak_gpu_bytes", "gpu_bytes_beyond_weights"})
    for section, required in fields.items():
        assert s[section], f"no {section} rows"
        for row in s[section]:
            assert required <= set(row), (section, row)
            assert "error" not in row, (section, row)  # nothing fails or is skipped in the dry run
    assert {r["policy"] for r in s["decode"]} <= {"none", "layer", "head", "hf_offloaded"}
    assert {"none", "layer", "head"} <= {r["policy"] for r in s["decode"]}
    assert all(r["s_per_token"] > 0 for r in s["decode"]) and all(r["seconds"] > 0 for r in s["prefill"])
    assert all(r["peak_gpu_bytes"] is None for r in s["memory"])  # no GPU: no peak to report
    assert {"standard", "chunked", "layer", "head"} == set(s["max_context_24gib"])
    assert all(isinstance(n, int) and n > 0 for n in s["max_context_24gib"].values())
    assert all(t["status"] in ("PASS", "FAIL", "n/a") for t in s["targets"])
    for name in ("ceilings", "memory", "decode", "prefill", "max_context", "hf"):
        assert (out / f"{name}.json").is_file(), name


def test_dry_run_ends_with_the_targets_table(dry_run):
    _, stdout = dry_run
    tail = stdout[stdout.index("targets:"):]
    assert "PASS" in tail or "FAIL" in tail or "n/a" in tail


def test_fill_cache_gives_every_policy_the_same_cache():
    """The same (layer, head, position) gets the same value in every layout, so a decode step after
    fill_cache gives the standard cache's logits for every offload policy and grouping."""
    args = DRY_ARGS
    model = build_model(args, torch.device("cpu"), torch.float32)
    length, max_len = 150, 160
    caches = [StandardCache(args, 1, max_len, "cpu", torch.float32),
              LayerOffloadCache(args, 1, max_len, "cpu", torch.float32),
              HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group_size=1, resident=0),
              HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group_size=1, resident=1),
              HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group_size=2, resident=2)]
    token, pos = torch.tensor([[7]]), torch.tensor([length])
    for cache in caches:
        fill_cache(cache, length, seed=5, block=64, copy_tokens=128)  # several tiles and several writes
        assert cache.length == length
        for layer in range(args.n_layer):
            assert all(torch.equal(a, b) for a, b in zip(cache.read(layer), caches[0].read(layer)))
    k0, k1 = caches[0].read(0)[0], caches[0].read(1)[0]
    with torch.no_grad():
        logits = [model(token, pos, cache) for cache in caches]
    assert torch.equal(k1[:, :, 3], k1[:, :, 3 + 64])  # tiled with the block's period
    assert not torch.equal(k0, k1)  # but different per layer
    for got in logits[1:]:
        assert torch.equal(got, logits[0])  # the same attention calls on the same values: bit for bit
    other = StandardCache(args, 1, max_len, "cpu", torch.float32)
    fill_cache(other, length, seed=6)
    assert not torch.equal(other.read(0)[0], k0)  # the seed matters


def test_prompt_cache_bench_dry_run(tmp_path):
    """Every path of bench/prompt_cache.py's io rows on a tiny model: it checks itself that a loaded
    cache gives the cold run's next token, and records MB/s for save and both loads."""
    out = tmp_path / "pc.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "prompt_cache.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["io"]
    assert [r["policy"] for r in rows] == ["none", "head"]
    for r in rows:
        assert r["file_bytes"] > 0 and min(r["save_mb_s"], r["load_disk_mb_s"], r["load_page_cache_mb_s"]) > 0


def test_many_questions_bench_dry_run(tmp_path):
    """bench/many_questions.py on a tiny model: it checks itself that every answer together equals the
    answer alone (fp32), and records a rate for each batch size."""
    out = tmp_path / "mq.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "many_questions.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = json.loads(out.read_text())["run"]
    assert [r["questions"] for r in run["together"]] == [1, 2, 4]
    for r in run["together"]:
        assert r["answers_equal_alone"] == r["questions"] and r["decode_tok_s"] > 0 and r["speedup"] > 0


@pytest.mark.parametrize("part,steps", [
    (1, ["env", "tests", "ceilings", "decode_streamed", "decode_short", "prefill", "memory", "sync", "hf"]),
    (2, ["env", "prompt_cache", "many_questions", "window_kernels", "speculative", "quantized"]),
])
def test_the_gpu_session_dry_run_runs_every_step(part, steps, tmp_path):
    """The one device call (bench/NOTES.md, "Running on a GPU") must not crash on a typo there: every
    step runs here on the CPU with tiny shapes, and writes its JSON."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "--dry-run", "--part", str(part),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for step in steps:
        result = json.loads((tmp_path / f"{step}.json").read_text())
        assert "error" not in result and "not_run" not in result, (step, result)
        assert not [r for r in result.get("rows", []) if r.get("error")], (step, result)
    if part == 1:
        assert json.loads((tmp_path / "tests.json").read_text())["returncode"] == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        ours = [r for r in summary["decode"] if r["policy"] != "hf_offloaded"]
        assert ours and all({"pcie_util", "hbm_util", "resident_heads", "s_per_token"} <= set(r) for r in ours)
        assert all(r["roofline_fraction"] > 0 for r in summary["prefill"])
        assert "targets:" in p.stdout
    else:
        assert all(json.loads((tmp_path / f"{s}.json").read_text())["returncode"] == 0 for s in steps[1:3] + steps[4:])
        speculative = json.loads((tmp_path / "speculative.json").read_text())["result"]
        assert {"verify_vs_one", "draft_vs_streamed"} <= set(speculative["gpu"]["rows"][0])
        quantized = json.loads((tmp_path / "quantized.json").read_text())["result"]["gpu"]
        float_row, int8_row = quantized["capped_128k"]  # the room int8 frees becomes resident KV
        assert int8_row["resident_fraction"] > float_row["resident_fraction"]
        assert quantized["70b_int8"]["s_per_token"] > 0
