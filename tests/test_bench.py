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
    logits = []
    for cache in caches:
        fill_cache(cache, length, seed=5, block=64, copy_tokens=128)  # several tiles and several copies
        assert cache.length == length
        with torch.no_grad():
            logits.append(model(token, pos, cache))
    ref = caches[0]
    head = caches[3]  # layer 0 keeps head 0 resident, streams head 1; layer 1 streams both
    assert torch.equal(head.res_k[0][:, :length, 0], ref.k[0, :, :length, 0])
    assert torch.equal(head.store_v[0][:, :length, 0], ref.v[0, :, :length, 1])
    assert torch.equal(ref.k[1, :, 3], ref.k[1, :, 3 + 64])  # tiled with the block's period
    assert not torch.equal(ref.k[0], ref.k[1])  # but different per layer
    for got in logits[1:]:
        assert (got - logits[0]).abs().max().item() <= 1e-5
    other = StandardCache(args, 1, max_len, "cpu", torch.float32)
    fill_cache(other, length, seed=6)
    assert not torch.equal(other.k[:, :, :length], ref.k[:, :, :length])  # the seed matters
