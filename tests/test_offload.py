"""Every offload policy gives the standard cache's logits and greedy tokens on CPU, bit for bit.

Bit for bit because on the CPU every policy makes the same attention calls (one per KV head,
attention.attention) on the same values: only the memory they sit in differs. So each comparison runs
the reference and the policy with the same chunking, and asserts torch.equal. Different chunkings
are different computations; where a test compares those, its tolerance says why.
"""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import generate, prefill
from model import ModelArgs, Transformer
from offload import HeadOffloadCache, LayerOffloadCache, StandardCache, spread_resident

ROOT = Path(__file__).resolve().parent.parent


def tiny_model(n_head, n_kv_head, n_layer=3, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=48, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, head_dim=8,
                     intermediate_size=96, vocab_size=97, max_seq_len=256, rope_base=10000.0)
    model = Transformer(args).eval()
    for p in model.parameters():  # larger than default init so attention patterns are not flat
        torch.nn.init.normal_(p, std=0.25)
    return model


@torch.no_grad()
def logits_of(model, cache, tokens, chunk, n_decode, start=0):
    """Chunked prefill (every position's logits) then n_decode greedy steps, at the positions from
    `start` on (what the cache holds before); all logits concatenated."""
    out, T = [], tokens.shape[1]
    for s in range(0, T, chunk):
        part = tokens[:, s:s + chunk]
        out.append(model(part, torch.arange(start + s, start + s + part.shape[1], device=tokens.device), cache))
    token = out[-1][:, -1:].argmax(-1)
    for i in range(n_decode):
        out.append(model(token, torch.tensor([start + T + i], device=tokens.device), cache))
        token = out[-1][:, -1:].argmax(-1)
    return torch.cat(out, dim=1)


def policies(args, batch, max_len):
    """Every policy and head layout worth telling apart: group sizes, none/some/all resident."""
    slots = args.n_layer * args.n_kv_head
    yield "layer", LayerOffloadCache(args, batch, max_len, "cpu", torch.float32)
    # slots - 1 resident: a single streamed unit, whose write-back and next copy follow each other
    for group, resident in itertools.product(range(1, args.n_kv_head + 1),
                                             sorted({0, 1, slots // 2, slots - 1, slots})):
        yield f"head g={group} r={resident}", HeadOffloadCache(args, batch, max_len, "cpu", torch.float32,
                                                               group, resident)


GQA = [(4, 4), (4, 2), (6, 3), (4, 1)]  # MHA, GQA 2:1, GQA 2:1 with odd n_kv, MQA


@pytest.mark.parametrize("n_head,n_kv", GQA)
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_every_policy_and_grouping_equals_standard_bit_for_bit(n_head, n_kv, chunk):
    model = tiny_model(n_head, n_kv)
    args, T, n_decode = model.args, 37, 32
    tokens = torch.randint(0, args.vocab_size, (1, T))
    ref = logits_of(model, StandardCache(args, 1, T + n_decode, "cpu", torch.float32), tokens, chunk, n_decode)
    for name, cache in policies(args, 1, T + n_decode):
        assert torch.equal(logits_of(model, cache, tokens, chunk, n_decode), ref), name


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_bit_for_bit_at_any_thread_count(threads):
    """The CPU kernels split work by thread count; every policy must still do identical arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_model(6, 3, n_layer=2)
        tokens = torch.randint(0, model.args.vocab_size, (1, 150))  # long enough for a split key range
        ref = logits_of(model, StandardCache(model.args, 1, 166, "cpu", torch.float32), tokens, 50, 16)
        for name, cache in policies(model.args, 1, 166):
            assert torch.equal(logits_of(model, cache, tokens, 50, 16), ref), (threads, name)
    finally:
        torch.set_num_threads(before)


def test_batch_of_two_equals_standard():
    model = tiny_model(4, 2)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 19))
    ref = logits_of(model, StandardCache(args, 2, 40, "cpu", torch.float32), tokens, 4, 8)
    for name, cache in policies(args, 2, 40):
        assert torch.equal(logits_of(model, cache, tokens, 4, 8), ref), name


def test_chunked_prefill_is_not_top_left_aligned():
    """A chunk must see all earlier tokens: changing the first token changes the last chunk's logits."""
    model = tiny_model(4, 2)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (1, 24))
    full = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), tokens, 24, 0)
    chunked = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), tokens, 8, 0)
    # Chunks of 8 and one chunk of 24 are different kernel calls (other matmul and SDPA shapes), so fp32
    # sums round differently: |logits| < 20 here, fp32's relative 6e-8 over ~100-term sums in 3 layers
    # stays far below 1e-5, while a mask aligned top-left would change logits by O(1).
    assert (full - chunked).abs().max().item() <= 1e-5
    # and the reference itself is causal: the logits at position t do not depend on token t+1
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % args.vocab_size
    other = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), changed, 24, 0)
    assert torch.equal(other[:, :10], full[:, :10])
    assert not torch.equal(other[:, 10:], full[:, 10:])


@pytest.mark.parametrize("policy", ["layer", "head"])
def test_generate_greedy_tokens_match_standard(policy):
    model = tiny_model(6, 3)
    prompt = torch.randint(0, model.args.vocab_size, (53,)).tolist()
    ref = generate(model, prompt, 40, offload="none", prefill_chunk=7)
    got = generate(model, prompt, 40, offload=policy, prefill_chunk=7)
    assert got == ref and len(got) == 40


def test_cache_refuses_to_overflow():
    model = tiny_model(4, 2)
    cache = StandardCache(model.args, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache full"):
        logits_of(model, cache, torch.zeros(1, 9, dtype=torch.long), 9, 0)


def test_spread_resident_is_even():
    shape = lambda n_layer, n_kv, **kw: ModelArgs(n_layer=n_layer, n_head=n_kv, n_kv_head=n_kv, **kw)
    assert spread_resident(5, shape(3, 4)) == [2, 2, 1]
    assert spread_resident(100, shape(3, 4)) == [4, 4, 4]
    assert sum(spread_resident(7, shape(4, 2))) == 7
    # Sliding-window layers keep their rings on the device: no slots of theirs are counted or spread.
    assert spread_resident(5, shape(4, 4, sliding_window=8, sliding_layers=[0, 2])) == [0, 3, 0, 2]


# --- the public surface: length, read, write, truncate ------------------------------------------

@torch.no_grad()
def test_read_gives_every_policy_the_same_rows():
    model = tiny_model(6, 3)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 30))
    ref = StandardCache(args, 2, 40, "cpu", torch.float32)
    prefill(model, ref, tokens, chunk=8)
    assert ref.length == 30
    for name, cache in policies(args, 2, 40):
        prefill(model, cache, tokens, chunk=8)
        assert cache.length == 30, name
        for layer in range(args.n_layer):
            k, v = cache.read(layer)
            assert k.shape == (2, args.n_kv_head, 30, args.head_dim), name
            assert torch.equal(k, ref.read(layer)[0]) and torch.equal(v, ref.read(layer)[1]), (name, layer)
            assert torch.equal(cache.read(layer, 7, 19)[1], v[:, :, 7:19]), name
    assert not torch.equal(ref.read(0)[0], ref.read(1)[0])  # layers differ: a mix-up would show


@torch.no_grad()
def test_written_rows_decode_like_the_prefilled_cache():
    """K/V written into any policy's cache, layer by layer, continue exactly as the cache they came from."""
    model = tiny_model(4, 2)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (1, 25))
    source = StandardCache(args, 1, 40, "cpu", torch.float32)
    prefill(model, source, tokens, chunk=25)
    token, pos = torch.tensor([[5]]), torch.tensor([25])
    expected = model(token, pos, source)
    source.truncate(25)  # the step above stored position 25; forget it
    for name, cache in policies(args, 1, 40):
        for s in (0, 12):  # two pieces, each written to every layer before the next
            for layer in range(args.n_layer):
                k, v = source.read(layer, s, min(s + 12, 25) if s == 0 else 25)
                cache.write(layer, s, k, v)
                assert cache.length == (s if layer < args.n_layer - 1 else s + k.shape[2])
        assert torch.equal(model(token, pos, cache), expected), name


@torch.no_grad()
def test_truncate_then_continue_equals_never_having_gone_there():
    model = tiny_model(6, 3)
    args = model.args
    prompt = torch.randint(0, args.vocab_size, (1, 20))
    detour, other = torch.randint(0, args.vocab_size, (1, 9)), torch.randint(0, args.vocab_size, (1, 6))

    def run(cache, take_detour):
        prefill(model, cache, prompt, chunk=6)
        if take_detour:
            prefill(model, cache, detour, chunk=4)  # a turn that is then taken back
            cache.truncate(20)
        return prefill(model, cache, other, chunk=6)

    ref = run(StandardCache(args, 1, 40, "cpu", torch.float32), False)
    for name, cache in [("standard", StandardCache(args, 1, 40, "cpu", torch.float32)), *policies(args, 1, 40)]:
        assert torch.equal(run(cache, True), ref), name
        assert cache.length == 26


def test_surface_refuses_what_would_corrupt_the_cache():
    args = tiny_model(4, 2).args
    cache = HeadOffloadCache(args, 1, 16, "cpu", torch.float32, group_size=1, resident=1)
    rows = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cannot write"):
        cache.write(0, 2, rows, rows)  # a gap after the 0 stored positions
    with pytest.raises(ValueError, match="shape"):
        cache.write(0, 0, rows[:, :1], rows[:, :1])
    for layer in range(args.n_layer):
        cache.write(layer, 0, rows, rows)
    assert cache.length == 4
    with pytest.raises(ValueError, match="cannot read"):
        cache.read(0, 0, 5)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(5)
    with pytest.raises(ValueError, match="cannot write"):
        cache.write(0, 14, rows, rows)  # past max_len


# --- memory -------------------------------------------------------------------------------------

COMMITTED = """
import json, sys, torch
from model import ModelArgs
from offload import HeadOffloadCache, StandardCache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

args = ModelArgs(dim=64, n_layer=4, n_head=4, n_kv_head=2, head_dim=64, intermediate_size=64, vocab_size=16,
                 max_seq_len=1 << 20)
n = 60_000  # 2 * 4 layers * 2 heads * 64 * 4 bytes = 4 KiB per token: 240 MiB
before = rss()
cache = (StandardCache(args, 1, n, "cpu", torch.float32) if sys.argv[1] == "standard" else
         HeadOffloadCache(args, 1, n, "cpu", torch.float32, group_size=1, resident=1))
print(json.dumps({"grew": rss() - before, "host_bytes": cache.host_bytes, "expected": n * args.kv_bytes_per_token(torch.float32)}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("policy", ["standard", "head"])
def test_cpu_cache_memory_is_committed_when_allocated(policy):
    """Pages the OS has not backed yet would pass the RAM check and then grow with every token.
    Measured in a fresh process: in this one, memory that earlier tests freed would be reused."""
    import os
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("the probe assumes 4 KiB pages")
    r = subprocess.run([sys.executable, "-c", COMMITTED, policy], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True)
    m = json.loads(r.stdout)
    assert m["host_bytes"] >= m["expected"]
    assert m["grew"] >= 0.9 * m["host_bytes"], m


def test_prefill_mask_is_lengths_only():
    """torch's causal_lower_right allocates a [2, T, S] fp32 host tensor (64 GiB for 8K x 1M); ours is
    the same bottom-right mask without the storage."""
    from torch.nn.attention.bias import causal_lower_right

    from attention import _lower_right
    assert _lower_right(8192, 1 << 20).untyped_storage().nbytes() < 1024
    assert torch.equal(_lower_right(5, 9)._materialize(), causal_lower_right(5, 9)._materialize())


class FakeRuntime:
    """Stands in for the CUDA runtime calls of offload.pinned_empty and _unpin, recording them."""

    def __init__(self, register_error=0):
        self.register_error, self.calls = register_error, []

    def host_register(self, ptr, nbytes, flags):
        self.calls.append(("register", nbytes, flags))
        return self.register_error

    def host_unregister(self, ptr):
        self.calls.append(("unregister",))
        return 0

    def clear_last_error(self):
        self.calls.append(("clear",))


def test_pinning_registers_the_exact_size_for_every_device(monkeypatch):
    import offload
    runtime = FakeRuntime()
    monkeypatch.setattr(offload, "cuda_runtime", lambda: runtime)
    t = offload.pinned_empty(1000, torch.bfloat16)
    assert t.numel() == 1000 and runtime.calls == [("register", 2000, offload.HOST_REGISTER_PORTABLE)]


def test_a_failed_pinning_clears_cudas_last_error_and_says_so(monkeypatch):
    """Left set, the error of a failed cudaHostRegister is what the next kernel launch reports."""
    import offload
    runtime = FakeRuntime(register_error=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(offload, "cuda_runtime", lambda: runtime)
    with pytest.raises(MemoryError, match=r"cudaHostRegister failed \(CUDA error 2\) pinning"):
        offload.pinned_empty(1 << 20, torch.float32)
    assert runtime.calls[-1] == ("clear",)


def test_unpinning_unregisters_even_when_the_synchronize_fails(monkeypatch):
    import offload
    runtime = FakeRuntime()
    monkeypatch.setattr(offload, "cuda_runtime", lambda: runtime)

    class Broken:
        def synchronize(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        offload._unpin(torch.empty(4), Broken())
    assert runtime.calls == [("unregister",)]
