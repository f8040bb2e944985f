"""Every offload policy gives the standard cache's logits (fp32, <= 1e-5) and greedy tokens, on CPU."""
import itertools
import os

import pytest
import torch

from generate import generate
from model import ModelArgs, Transformer
from offload import (GiB, HeadOffloadCache, LayerOffloadCache, PlanError, StandardCache, plan_memory,
                     spread_resident)

TOL = 1e-5


def tiny_model(n_head, n_kv_head, n_layer=3, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=48, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, head_dim=8,
                     intermediate_size=96, vocab_size=97, max_seq_len=256, rope_base=10000.0)
    model = Transformer(args).eval()
    for p in model.parameters():  # larger than default init so attention patterns are not flat
        torch.nn.init.normal_(p, std=0.25)
    return model


@torch.no_grad()
def logits_of(model, cache, tokens, chunk, n_decode):
    """Chunked prefill (every position's logits) then n_decode greedy steps; all logits concatenated."""
    out, T = [], tokens.shape[1]
    for s in range(0, T, chunk):
        part = tokens[:, s:s + chunk]
        out.append(model(part, torch.arange(s, s + part.shape[1]), cache))
    token = out[-1][:, -1:].argmax(-1)
    for i in range(n_decode):
        out.append(model(token, torch.tensor([T + i]), cache))
        token = out[-1][:, -1:].argmax(-1)
    return torch.cat(out, dim=1)


GQA = [(4, 4), (4, 2), (6, 3), (4, 1)]  # MHA, GQA 2:1, GQA 2:1 with odd n_kv, MQA


@pytest.mark.parametrize("n_head,n_kv", GQA)
def test_head_offload_matches_standard_for_every_grouping(n_head, n_kv):
    model = tiny_model(n_head, n_kv)
    args, T, n_decode = model.args, 37, 32
    tokens = torch.randint(0, args.vocab_size, (1, T))
    max_len = T + n_decode
    ref = logits_of(model, StandardCache(args, 1, max_len, "cpu", torch.float32), tokens, T, n_decode)
    slots = args.n_layer * n_kv
    for group, resident, chunk in itertools.product(range(1, n_kv + 1), [0, 1, slots // 2, slots], [1, 5, 16, 64]):
        cache = HeadOffloadCache(args, 1, max_len, "cpu", torch.float32, group, resident)
        got = logits_of(model, cache, tokens, chunk, n_decode)
        err = (got - ref).abs().max().item()
        assert err <= TOL, f"group={group} resident={resident} chunk={chunk}: max abs diff {err}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("n_head,n_kv", GQA)
def test_layer_offload_matches_standard(n_head, n_kv):
    model = tiny_model(n_head, n_kv)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (1, 29))
    ref = logits_of(model, StandardCache(args, 1, 80, "cpu", torch.float32), tokens, 29, 40)
    for chunk in (1, 6, 29):
        got = logits_of(model, LayerOffloadCache(args, 1, 80, "cpu", torch.float32), tokens, chunk, 40)
        assert (got - ref).abs().max().item() <= TOL


def test_chunked_prefill_is_not_top_left_aligned():
    """A chunk must see all earlier tokens: changing the first token changes the last chunk's logits."""
    model = tiny_model(4, 2)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (1, 24))
    full = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), tokens, 24, 0)
    chunked = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), tokens, 8, 0)
    assert (full - chunked).abs().max().item() <= TOL
    # and the reference itself is causal: the logits at position t do not depend on token t+1
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % args.vocab_size
    other = logits_of(model, StandardCache(args, 1, 24, "cpu", torch.float32), changed, 24, 0)
    assert torch.equal(other[:, :10], full[:, :10])
    assert not torch.equal(other[:, 10:], full[:, 10:])


def test_batch_of_two_matches_standard():
    model = tiny_model(4, 2)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 19))
    ref = logits_of(model, StandardCache(args, 2, 40, "cpu", torch.float32), tokens, 19, 8)
    got = logits_of(model, HeadOffloadCache(args, 2, 40, "cpu", torch.float32, 1, 2), tokens, 4, 8)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("policy", ["layer", "head"])
def test_generate_greedy_tokens_match_standard(policy):
    model = tiny_model(6, 3)
    prompt = torch.randint(0, model.args.vocab_size, (53,)).tolist()
    ref = generate(model, prompt, 40, offload="none", prefill_chunk=16)
    got = generate(model, prompt, 40, offload=policy, prefill_chunk=7, gpu_kv_budget=None)
    assert got == ref and len(got) == 40


def test_cache_refuses_to_overflow():
    model = tiny_model(4, 2)
    cache = StandardCache(model.args, 1, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache full"):
        logits_of(model, cache, torch.zeros(1, 9, dtype=torch.long), 9, 0)


# --- the memory planner -------------------------------------------------------------------------

LLAMA3_8B = ModelArgs.from_name("Meta-Llama-3-8B")


def test_kv_bytes_per_token_llama3_8b():
    assert LLAMA3_8B.kv_bytes_per_token(torch.bfloat16) == 128 * 1024  # DESIGN.md: 128 KiB per token


def test_plan_everything_resident_when_it_fits():
    plan = plan_memory(LLAMA3_8B, 32_768, torch.bfloat16, "head", gpu_budget=8 * GiB)
    assert plan.resident_slots == plan.total_slots and plan.kv_bytes_cpu == 0 and plan.buffer_bytes == 0


def test_plan_adaptive_grouping_shrinks_groups_as_context_grows():
    sizes = [plan_memory(LLAMA3_8B, n, torch.bfloat16, "head", gpu_budget=4 * GiB).group_size
             for n in (100_000, 500_000, 1_000_000, 4_000_000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 8 and sizes[-1] == 1


def test_plan_at_1m_tokens_keeps_gpu_kv_within_budget():
    budget = 2 * GiB
    plan = plan_memory(LLAMA3_8B, 1 << 20, torch.bfloat16, "head", gpu_budget=budget)
    assert plan.kv_bytes_total == 128 * GiB
    assert plan.kv_bytes_gpu <= budget
    assert plan.kv_bytes_gpu + plan.kv_bytes_cpu == plan.kv_bytes_total + plan.buffer_bytes
    slot = 2 * (1 << 20) * 128 * 2  # K and V of one head for 1M tokens in bf16: 512 MiB
    # A quarter of 2 GiB cannot hold two 1-head buffers, so groups are single heads (1 GiB of
    # buffers), and the other 1 GiB keeps two slots resident.
    assert plan.group_size == 1 and plan.buffer_bytes == 2 * slot and plan.resident_slots == 2


def test_plan_refuses_budget_too_small_and_says_what_fits():
    with pytest.raises(PlanError, match="would fit"):
        plan_memory(LLAMA3_8B, 4_000_000, torch.bfloat16, "head", gpu_budget=GiB // 4)


def test_plan_refuses_host_ram_too_small_and_says_what_fits():
    with pytest.raises(PlanError, match="at most about .* tokens would fit"):
        plan_memory(LLAMA3_8B, 1_000_000, torch.bfloat16, "head", gpu_budget=2 * GiB, host_available=64 * GiB)


def test_plan_standard_refuses_over_budget():
    with pytest.raises(PlanError, match="--offload head"):
        plan_memory(LLAMA3_8B, 1_000_000, torch.bfloat16, "none", gpu_budget=16 * GiB)


def test_spread_resident_is_even():
    assert spread_resident(5, 3, 4) == [2, 2, 1]
    assert spread_resident(100, 3, 4) == [4, 4, 4]
    assert sum(spread_resident(7, 4, 2)) == 7


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("make", [
    lambda a, n: StandardCache(a, 1, n, "cpu", torch.float32),
    lambda a, n: HeadOffloadCache(a, 1, n, "cpu", torch.float32, group_size=1, resident=1),
])
def test_cpu_cache_memory_is_committed_when_allocated(make):
    """Pages the OS has not backed yet would pass the RAM check and then grow with every token."""
    args = ModelArgs(dim=64, n_layer=4, n_head=4, n_kv_head=2, head_dim=64, intermediate_size=64,
                     vocab_size=16, max_seq_len=1 << 20)
    n = 60_000  # 2 * 4 layers * 2 heads * 64 * 4 bytes = 4 KiB per token: 240 MiB
    before = rss_bytes()
    cache = make(args, n)
    assert rss_bytes() - before >= 0.9 * cache.kv_bytes_cpu >= 0.9 * n * args.kv_bytes_per_token(torch.float32)


def test_prefill_mask_is_lengths_only():
    """torch's causal_lower_right allocates a [2, T, S] fp32 host tensor (64 GiB for 8K x 1M); ours is
    the same bottom-right mask without the storage."""
    from torch.nn.attention.bias import causal_lower_right

    from offload import _lower_right
    assert _lower_right(8192, 1 << 20).untyped_storage().nbytes() < 1024
    assert torch.equal(_lower_right(5, 9)._materialize(), causal_lower_right(5, 9)._materialize())


def test_plan_on_a_cpu_device_counts_every_kv_byte_as_host_ram():
    host = 8 * GiB  # the standard cache at 128K is 16 GiB
    assert plan_memory(LLAMA3_8B, 131_072, torch.bfloat16, "none", host_available=host).kv_bytes_gpu == 16 * GiB
    with pytest.raises(PlanError, match="at most about 65536 tokens would fit"):
        plan_memory(LLAMA3_8B, 131_072, torch.bfloat16, "none", host_available=host, device_is_host=True)
